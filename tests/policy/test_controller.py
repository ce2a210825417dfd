"""Policy controller on a tiny random Llama (CPU, fp32): the batch-8 == 1 × 8 gradient-accumulation
invariant of every update path, and compute_advantages of each algorithm on hand-made tensors.

Legend: B rows, T tokens (left-padded prompt columns, then right-padded response columns), K samples
per prompt.
"""

import copy
import dataclasses

import pytest
import torch

from moslim_mega.algos import ppo
from moslim_mega.config import ModelConfig, PolicyConfig
from moslim_mega.models.build import build_backbone, build_causal_lm, build_tokenizer
from moslim_mega.models.value import ValueModel
from moslim_mega.policy.controller import Experience, actor_loss, compute_advantages, update_actor, update_critic
from moslim_mega.engine.torch_engine import TorchEngine
from moslim_mega.policy.workers import LogprobWorker, Updater

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
PROMPT_LENS = [2, 5, 3, 4, 5, 2, 3, 4]
RESPONSE_LENS = [1, 6, 2, 5, 3, 4, 6, 1]  # unequal on purpose: token weighting across micro-batches matters
P_COLS, R_COLS = max(PROMPT_LENS), max(RESPONSE_LENS)
B = len(PROMPT_LENS)
KL_COEF = 0.1


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def policy(tok):
    return build_causal_lm(TINY, tok, seed=0).train()


@pytest.fixture(scope="module")
def rollout(tok):
    """(ids_BT, attn_BT, mask_BT) laid out as the rollout engines do (rollout.base.assemble_batch): left-padded prompt, right-padded response."""
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.full((B, P_COLS + R_COLS), tok.pad_token_id)
    attn_BT = torch.zeros(B, P_COLS + R_COLS, dtype=torch.long)
    mask_BT = torch.zeros(B, P_COLS + R_COLS)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids_BT[b, P_COLS - p : P_COLS + r] = torch.randint(5, len(tok), (p + r,), generator=g)
        attn_BT[b, P_COLS - p : P_COLS + r] = 1
        mask_BT[b, P_COLS : P_COLS + r] = 1
    return ids_BT, attn_BT, mask_BT


@pytest.fixture(scope="module")
def experience(policy, rollout):
    """old log-probs = the policy's own + noise (so some ratios leave the clip range), ref log-probs
    from a perturbed copy (non-zero KL), random per-token advantages; all masked like the controller."""
    ids_BT, attn_BT, mask_BT = rollout
    g = torch.Generator().manual_seed(1)
    logp_BT, _ = LogprobWorker(policy).logprobs(ids_BT, attn_BT)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref_logp_BT, _ = LogprobWorker(reference).logprobs(ids_BT, attn_BT)
    old_logp_BT = (logp_BT + 0.2 * torch.randn(logp_BT.shape, generator=g)) * mask_BT
    adv_BT = torch.randn(mask_BT.shape, generator=g) * mask_BT
    return Experience(ids_BT, attn_BT, mask_BT, old_logp_BT, ref_logp_BT * mask_BT, adv_BT=adv_BT)


# ---- batch 8 == 1 × 8 gradient accumulation ------------------------------------------------
def _run_update(model, pc: PolicyConfig, fn, lr: float, role: str = "causal_lm"):
    """Deep copy of ``model`` in a training engine with a fresh Updater and a fresh generator with
    the same seed; → (copy, stats)."""
    m = copy.deepcopy(model)
    upd = Updater(m.parameters(), lr, pc.weight_decay, pc.warmup_steps, pc.grad_clip)
    return m, fn(TorchEngine(m, upd, role, "model"), pc, torch.Generator().manual_seed(0))


def _max_abs(tensors) -> float:
    return max(float(t.detach().abs().max()) for t in tensors)


def _assert_same_update(init, full, accum, min_change: float) -> None:
    """Same gradients of the last mini-batch (relative 1e-5 of the largest entry) and the same
    parameters after the update (5e-3 of the largest change, itself ≥ min_change).

    The gradient check is the sharp one. AdamW's first step is lr·g/(|g| + eps): ≈ lr·sign(g), so
    parameters alone would hide a mis-scaled gradient, and on entries with |g| ≈ eps = 1e-8 it turns
    fp32 rounding of the summation order (≈ 1e-10 absolute) into parameter differences of ≈ 1e-4·lr.
    """
    pairs = list(zip(full.named_parameters(), accum.parameters(), init.parameters()))
    grads_full = [pf.grad for (_, pf), _, _ in pairs]
    grads_accum = [pa.grad for _, pa, _ in pairs]
    assert all(g is not None for g in grads_full + grads_accum)
    scale = _max_abs(grads_full)
    assert scale > 0
    for (name, _), gf, ga in zip(full.named_parameters(), grads_full, grads_accum):
        assert torch.allclose(gf, ga, rtol=0, atol=1e-5 * scale), (name, float((gf - ga).abs().max()), scale)
    change = _max_abs(pf - p0 for (_, pf), _, p0 in pairs)
    assert change >= min_change, change
    for (name, pf), pa, _ in pairs:
        assert torch.allclose(pf, pa, rtol=0, atol=5e-3 * change), (name, float((pf - pa).abs().max()), change)


ACTOR_PC = PolicyConfig(
    mini_batch_size=8, micro_batch_size=8, update_epochs=1, kl_in_reward=False, entropy_coef=0.01,
    lr=1e-2, warmup_steps=0, grad_clip=0.0,
)


@pytest.mark.parametrize("mini, epochs", [(8, 1), (4, 2)])
def test_actor_batch_equals_micro_batch_accumulation(policy, experience, mini, epochs):
    """Clipped surrogate + KL loss term + entropy bonus: micro=mini vs micro=1, same update."""
    pc = dataclasses.replace(ACTOR_PC, mini_batch_size=mini, micro_batch_size=mini, update_epochs=epochs)

    def update(engine, pc_, gen):
        return update_actor(engine, experience, pc_, KL_COEF, gen)

    full, stats = _run_update(policy, pc, update, pc.lr)
    accum, stats_accum = _run_update(policy, dataclasses.replace(pc, micro_batch_size=1), update, pc.lr)
    assert stats["clipfrac"] > 0  # the clipped branch is exercised, not only ρ = 1
    assert stats["policy_grad_norm"] == pytest.approx(stats_accum["policy_grad_norm"], rel=1e-5)
    _assert_same_update(policy, full, accum, min_change=0.5 * pc.lr)


def test_unequal_lengths_make_the_token_weighting_necessary(policy, experience):
    """Control for the test above: averaging per-row losses with equal weights (the naive
    accumulation) gives a clearly different gradient on this batch, so the invariant is not vacuous."""
    full, _ = _run_update(
        policy, ACTOR_PC, lambda engine, pc, gen: update_actor(engine, experience, pc, KL_COEF, gen), ACTOR_PC.lr
    )
    naive = copy.deepcopy(policy)
    worker = LogprobWorker(naive)
    for b in range(B):
        part = experience.rows(torch.tensor([b]))
        logp_BT, ent_BT = worker.logprobs(part.ids_BT, part.attn_BT, grad=True)
        loss, _ = actor_loss(ACTOR_PC, logp_BT, ent_BT, part, KL_COEF)
        (loss / B).backward()
    grads_full = [p.grad for p in full.parameters()]
    gap = _max_abs(p.grad - g for p, g in zip(naive.parameters(), grads_full))
    assert gap > 1e-2 * _max_abs(grads_full), gap


def test_online_dpo_pairs_equal_micro_batch_accumulation(policy, experience):
    """4 (chosen, rejected) pairs = 8 rows: micro 8 rows (4 pairs) vs micro 2 rows (1 pair)."""
    exp = dataclasses.replace(experience, chosen_P=torch.tensor([0, 3, 4, 7]), rejected_P=torch.tensor([1, 2, 5, 6]))
    pc = dataclasses.replace(ACTOR_PC, dpo_beta=0.5)

    def update(engine, pc_, gen):
        return update_actor(engine, exp, pc_, KL_COEF, gen)

    full, stats = _run_update(policy, pc, update, pc.lr)
    accum, stats_accum = _run_update(policy, dataclasses.replace(pc, micro_batch_size=2), update, pc.lr)
    assert "dpo_loss" in stats and "pg_loss" not in stats  # the DPO path, not the surrogate
    assert stats["reward_margin"] != 0  # the perturbed reference gives non-zero log-ratios
    _assert_same_update(policy, full, accum, min_change=0.5 * pc.lr)


def test_critic_batch_equals_micro_batch_accumulation(policy, experience):
    critic = ValueModel(copy.deepcopy(policy.model)).train()
    with torch.no_grad():
        # ValueModel's head starts at 0, which would give the backbone zero gradient; a random head
        # makes the comparison cover every critic parameter.
        critic.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    mask_BT = experience.mask_BT
    exp = dataclasses.replace(
        experience,
        old_values_BT=torch.randn(mask_BT.shape, generator=g) * mask_BT,
        returns_BT=torch.randn(mask_BT.shape, generator=g) * mask_BT,
    )
    pc = dataclasses.replace(ACTOR_PC, critic_lr=1e-2, value_clip_range=0.2)

    def update(engine, pc_, gen):
        return update_critic(engine, exp, pc_, gen)

    full, stats = _run_update(critic, pc, update, pc.critic_lr, "value")
    accum, _ = _run_update(critic, dataclasses.replace(pc, micro_batch_size=1), update, pc.critic_lr, "value")
    assert 0 < stats["vf_clipfrac"] < 1  # both branches of the clipped value loss occur
    _assert_same_update(critic, full, accum, min_change=0.5 * pc.critic_lr)


# ---- compute_advantages ---------------------------------------------------------------------
def _hand_experience(mask_BT: torch.Tensor, seed: int = 0) -> Experience:
    g = torch.Generator().manual_seed(seed)
    B_, T = mask_BT.shape
    ids_BT = torch.randint(5, 100, (B_, T), generator=g)
    old_BT = -torch.rand(B_, T, generator=g) * 3 * mask_BT
    ref_BT = -torch.rand(B_, T, generator=g) * 3 * mask_BT
    return Experience(ids_BT, torch.ones(B_, T, dtype=torch.long), mask_BT, old_BT, ref_BT)


# 2 prompts × K=3; responses of 1-4 tokens after 1-2 prompt columns.
HAND_MASK = torch.tensor(
    [
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
    ],
    dtype=torch.float32,
)
HAND_REWARD = torch.tensor([1.0, 3.0, -1.0, 0.5, 0.0, 2.0])


def _loo(seq_B: torch.Tensor, K: int) -> torch.Tensor:
    """A_i = r_i − mean_{j≠i} r_j, written out independently of rloo_advantages."""
    r_PK = seq_B.view(-1, K)
    return torch.stack([r_PK[:, i] - (r_PK.sum(1) - r_PK[:, i]) / (K - 1) for i in range(K)], dim=1).flatten()


@pytest.mark.parametrize("kl_in_reward", [True, False])
@pytest.mark.parametrize("whiten", [False, True])
def test_rloo_advantages_are_leave_one_out_of_score_minus_beta_kl(kl_in_reward, whiten):
    exp = _hand_experience(HAND_MASK)
    pc = PolicyConfig(algo="rloo", kl_in_reward=kl_in_reward, whiten_advantages=whiten, kl_estimator="k1")
    metrics = compute_advantages(pc, exp, HAND_REWARD, KL_COEF, K=3)
    kl_sum_B = ((exp.old_logp_BT - exp.ref_logp_BT) * HAND_MASK).sum(1)
    seq_B = HAND_REWARD - (KL_COEF * kl_sum_B if kl_in_reward else 0.0)
    adv_B = _loo(seq_B, 3)
    if whiten:
        adv_B = (adv_B - adv_B.mean()) / adv_B.std()
    torch.testing.assert_close(exp.adv_BT, adv_B[:, None] * HAND_MASK, atol=1e-5, rtol=1e-5)
    assert metrics["kl"] == pytest.approx(float(kl_sum_B.mean()), abs=1e-6)
    assert exp.returns_BT is None and exp.old_values_BT is None and exp.chosen_P is None
    if not whiten:
        # Leave-one-out advantages of one prompt sum to zero.
        torch.testing.assert_close(adv_B.view(2, 3).sum(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_rloo_kl_in_reward_changes_the_advantages():
    """Guard against a test that passes because the KL happened to cancel: β matters on this batch."""
    a, b = _hand_experience(HAND_MASK), _hand_experience(HAND_MASK)
    for exp, kl_in_reward in ((a, True), (b, False)):
        pc = PolicyConfig(algo="rloo", whiten_advantages=False, kl_in_reward=kl_in_reward)
        compute_advantages(pc, exp, HAND_REWARD, KL_COEF, K=3)
    assert float((a.adv_BT - b.adv_BT).abs().max()) > 1e-3


def test_online_dpo_pairs_use_global_row_indices_and_drop_ties():
    K = 3
    reward_B = torch.tensor([0.1, 0.5, 0.2, 1.0, 1.0, 1.0, 0.3, -0.2, 0.9])  # prompt 1 is a 3-way tie
    mask_BT = torch.ones(9, 3)
    mask_BT[:, 0] = 0
    exp = _hand_experience(mask_BT)
    metrics = compute_advantages(PolicyConfig(algo="online_dpo"), exp, reward_B, KL_COEF, K=K)
    assert exp.chosen_P.tolist() == [1, 8]  # prompt 0 → row 0·3+1, prompt 2 → row 2·3+2
    assert exp.rejected_P.tolist() == [0, 7]
    assert metrics["dpo_pairs"] == 2
    assert exp.adv_BT is None


def test_online_dpo_all_tied_gives_no_pairs():
    exp = _hand_experience(torch.ones(4, 3))
    metrics = compute_advantages(PolicyConfig(algo="online_dpo"), exp, torch.full((4,), 0.7), KL_COEF, K=2)
    assert metrics["dpo_pairs"] == 0 and exp.chosen_P.numel() == 0 and exp.rejected_P.numel() == 0


@pytest.fixture(scope="module")
def zero_critic(tok):
    return ValueModel(build_backbone(TINY, tok, seed=0)).eval()


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_ppo_with_zero_critic_returns_are_reward_to_go(zero_critic, kl_in_reward):
    """γ = λ = 1 and V ≡ 0 (ValueModel's zero-initialised head): the return at token t is the sum of
    the per-token rewards from t on, so at the last token it is score − β·kl_last and at the first
    response token score − β·Σ kl."""
    exp = _hand_experience(HAND_MASK)
    pc = PolicyConfig(algo="ppo", gamma=1.0, lam=1.0, whiten_advantages=False, kl_in_reward=kl_in_reward)
    compute_advantages(pc, exp, HAND_REWARD, KL_COEF, K=3, critic=zero_critic)
    beta = KL_COEF if kl_in_reward else 0.0
    kl_BT = (exp.old_logp_BT - exp.ref_logp_BT) * HAND_MASK
    assert torch.equal(exp.old_values_BT, torch.zeros_like(HAND_MASK))
    for t in (exp.old_values_BT, exp.returns_BT, exp.adv_BT):
        assert bool(torch.isfinite(t).all())
    for b in range(HAND_MASK.shape[0]):
        cols = HAND_MASK[b].nonzero().flatten()
        first, last = int(cols[0]), int(cols[-1])
        want_last = HAND_REWARD[b] - beta * kl_BT[b, last]
        want_first = HAND_REWARD[b] - beta * kl_BT[b].sum()
        assert float(exp.returns_BT[b, last]) == pytest.approx(float(want_last), abs=1e-5)
        assert float(exp.returns_BT[b, first]) == pytest.approx(float(want_first), abs=1e-5)
    # V ≡ 0 → advantages are the returns; nothing outside the response mask.
    torch.testing.assert_close(exp.adv_BT, exp.returns_BT)
    assert bool((exp.returns_BT[HAND_MASK == 0] == 0).all())


def test_ppo_whitened_advantages_have_zero_mean_unit_std_over_the_mask(zero_critic):
    exp = _hand_experience(HAND_MASK)
    pc = PolicyConfig(algo="ppo", gamma=1.0, lam=1.0, whiten_advantages=True)
    compute_advantages(pc, exp, HAND_REWARD, KL_COEF, K=3, critic=zero_critic)
    adv_N = exp.adv_BT[HAND_MASK != 0]
    assert float(adv_N.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(adv_N.std()) == pytest.approx(1.0, abs=1e-4)
    # Whitening is affine, so it keeps the order of the raw returns.
    ret_N = exp.returns_BT[HAND_MASK != 0]
    assert torch.equal(adv_N.argsort(), ret_N.argsort())
    assert bool((exp.adv_BT[HAND_MASK == 0] == 0).all())


def test_ppo_gae_with_lambda_below_one_discounts_by_gamma_lambda(zero_critic):
    """With λ < 1 and V ≡ 0 GAE still reduces to discounted reward-to-go with factor γλ."""
    exp = _hand_experience(HAND_MASK)
    pc = PolicyConfig(algo="ppo", gamma=1.0, lam=0.5, whiten_advantages=False, kl_in_reward=True)
    compute_advantages(pc, exp, HAND_REWARD, KL_COEF, K=3, critic=zero_critic)
    kl_BT = (exp.old_logp_BT - exp.ref_logp_BT) * HAND_MASK
    rewards_BT = ppo.token_level_rewards(HAND_REWARD, kl_BT, HAND_MASK, KL_COEF)
    want_BT = torch.zeros_like(rewards_BT)
    for b in range(HAND_MASK.shape[0]):
        acc = 0.0
        for t in reversed(range(HAND_MASK.shape[1])):
            if HAND_MASK[b, t]:
                acc = float(rewards_BT[b, t]) + 0.5 * acc
                want_BT[b, t] = acc
    torch.testing.assert_close(exp.adv_BT, want_BT, atol=1e-5, rtol=1e-5)


def test_non_finite_advantages_raise_naming_the_step():
    from moslim_mega.algos.core import NonFiniteError

    exp = _hand_experience(HAND_MASK)
    reward_B = HAND_REWARD.clone()
    reward_B[4] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^step 7: advantages is not finite$"):
        compute_advantages(PolicyConfig(algo="rloo", whiten_advantages=False), exp, reward_B, KL_COEF, K=3, step=7)


def test_updater_refuses_a_non_finite_gradient():
    p = torch.nn.Parameter(torch.ones(3))
    upd = Updater([p], lr=1e-3, weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    p.grad = torch.tensor([float("nan"), 1.0, 1.0])
    with pytest.raises(RuntimeError, match="not finite"):  # NonFiniteError and TrainingError are RuntimeErrors
        upd.step()
    assert torch.equal(p.detach(), torch.ones(3))
