"""TorchEngine on tiny random models (CPU, fp32), one per role: 4 micro-batches of 1 row equal one
micro-batch of 4 (gradient accumulation), a step equals a hand-written loss.backward + clip + AdamW
step, a non-finite loss stops the step naming it, and build_engine's backend choice.

Legend: B rows, T tokens, D hidden size, C reward classes.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from moslim_mega.algos.core import NonFiniteError
from moslim_mega.algos.logprob import sequence_logprobs
from moslim_mega.config import ConfigError, ModelConfig, ParallelConfig
from moslim_mega.engine import build_engine, micro_batch_count, split_rows
from moslim_mega.engine.base import HeadIn, LogprobOut
from moslim_mega.engine.torch_engine import TorchEngine
from moslim_mega.models.build import build_backbone, build_causal_lm, build_tokenizer
from moslim_mega.models.value import ValueModel
from moslim_mega.reward.model import MultiHeadRewardModel
from moslim_mega.utils.optim import Updater

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
B, T = 4, 7
LENS = [7, 3, 5, 2]  # unequal right-padded rows


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def batch(tok):
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.full((B, T), tok.pad_token_id)
    mask_BT = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(LENS):
        ids_BT[b, :n] = torch.randint(5, len(tok), (n,), generator=g)
        mask_BT[b, :n] = 1
    target_B = torch.randn(B, generator=g)
    return {"ids_BT": ids_BT, "mask_BT": mask_BT, "target_B": target_B}


def _model(role: str, tok):
    if role == "causal_lm":
        return build_causal_lm(TINY, tok, seed=0).train()
    if role == "reward":
        return MultiHeadRewardModel(build_backbone(TINY, tok, seed=0), (3, 2)).train()
    critic = ValueModel(build_backbone(TINY, tok, seed=0)).train()
    with torch.no_grad():  # the head starts at 0, which would give the backbone no gradient
        critic.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return critic


def _row_losses(role: str, out, micro) -> torch.Tensor:
    """A per-row loss for each role's head output (any differentiable function will do)."""
    if role == "causal_lm":
        return -(out.logp_BT.sum(1)) + 0.1 * out.entropy_BT.sum(1)
    if role == "reward":
        logits_BC = F.linear(out.hidden_BD, out.weight_CD, out.bias_C)
        return (logits_BC - micro["target_B"][:, None]).square().mean(1)
    values_BT = out
    return ((values_BT - micro["target_B"][:, None]).square() * micro["mask_BT"]).sum(1)


def _loss_fn(role: str, total_rows: int):
    """Mean over the step's rows: each micro-batch's sum of row losses / the step's row count."""

    def loss_fn(out, micro):
        loss = _row_losses(role, out, micro).sum() / total_rows
        return loss, {"loss": float(loss.detach()), "rows": float(micro["ids_BT"].shape[0])}

    return loss_fn


def _engine(model, role: str, grad_clip: float = 0.5) -> TorchEngine:
    return TorchEngine(model, Updater(model.parameters(), 1e-2, 0.01, 0, grad_clip), role, "m", label="t")


def _slice(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


@pytest.mark.parametrize("role", ["causal_lm", "reward", "value"])
def test_four_micro_batches_of_one_equal_one_of_four(role, tok, batch):
    model = _model(role, tok)
    whole, accum = _engine(copy.deepcopy(model), role), _engine(copy.deepcopy(model), role)
    res_whole = whole.train_step([batch], _loss_fn(role, B), step=0)
    res_accum = accum.train_step([_slice(batch, b, b + 1) for b in range(B)], _loss_fn(role, B), step=0)
    grads_whole = [p.grad for p in whole.model.parameters()]
    scale = max(float(g.abs().max()) for g in grads_whole)
    assert scale > 0
    for (name, p), q in zip(whole.model.named_parameters(), accum.model.parameters()):
        assert p.grad is not None, name  # every parameter is trained (the heads included)
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5 * scale, msg=name)
    assert res_accum["grad_norm"] == pytest.approx(res_whole["grad_norm"], rel=1e-5)
    # The log rows are averaged over micro-batches: 4 rows of 1 vs one row of 4.
    assert (res_whole["rows"], res_accum["rows"]) == (4.0, 1.0)
    assert res_whole["lr"] == res_accum["lr"] == whole.lr


@pytest.mark.parametrize("role", ["causal_lm", "reward", "value"])
def test_a_step_is_the_hand_written_backward_clip_and_adamw_step(role, tok, batch):
    model = _model(role, tok)
    engine = _engine(copy.deepcopy(model), role, grad_clip=0.5)
    # One micro-batch: the same summation order as the reference, so AdamW's ≈ lr·sign(g) first
    # step cannot turn rounding of near-zero gradients into differences (accumulation: above).
    res = engine.train_step([batch], _loss_fn(role, B), step=0)

    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    ids_BT, mask_BT = batch["ids_BT"], batch["mask_BT"]
    if role == "causal_lm":
        out = LogprobOut(*sequence_logprobs(ref, ids_BT, mask_BT))
    elif role == "reward":
        out = ref(ids_BT, mask_BT, head=HeadIn)
    else:
        out = ref(ids_BT, mask_BT)
    loss = _row_losses(role, out, batch).sum() / B
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt.step()

    assert res["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert res["grad_norm"] > 0.5  # the clip is active, so a mis-ordered clip would show
    for (name, p), q in zip(ref.named_parameters(), engine.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), engine.model.parameters()))


def test_a_non_finite_loss_stops_the_step_naming_it_before_any_update(tok, batch):
    model = _model("value", tok)
    engine = _engine(copy.deepcopy(model), "value")

    def bad(out, micro):
        return out.sum() * float("nan"), {}

    with pytest.raises(NonFiniteError, match=r"^step 7: t loss is not finite$"):
        engine.train_step([batch], bad, step=7)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), engine.model.parameters()))


def test_forward_is_the_head_output_without_gradients(tok, batch):
    engine = _engine(_model("causal_lm", tok), "causal_lm")
    engine.temperature = 2.0
    out = engine.forward(batch)
    want_BT, _ = sequence_logprobs(engine.model, batch["ids_BT"], batch["mask_BT"], temperature=2.0)
    assert not out.logp_BT.requires_grad
    torch.testing.assert_close(out.logp_BT, want_BT.detach())


def test_checkpoint_items_and_scheduler_state_round_trip(tok):
    model = _model("value", tok)
    engine = _engine(model, "value")
    models, optims = engine.checkpoint_items()
    assert models == {"m": model} and optims == {"m": (model, engine.updater.opt)}
    other = _engine(copy.deepcopy(model), "value")
    engine.updater.sched.step()
    other.load_scheduler_state(engine.scheduler_state())
    assert other.scheduler_state() == engine.scheduler_state()


def test_build_engine_picks_the_backend(tok):
    model = _model("value", tok)
    built = []
    engine = build_engine(ParallelConfig(), lambda: built.append(1) or model,
                          lambda m: Updater(m.parameters(), 1e-3, 0.0, 0, 1.0), "value", "critic")
    assert isinstance(engine, TorchEngine) and engine.model is model and built == [1]
    with pytest.raises(ConfigError, match="parallel.backend=megatron"):
        build_engine(ParallelConfig(backend="megatron"), lambda: built.append(2), lambda m: None, "value", "critic")
    assert built == [1]  # refused before any model is built
    # Under pp a trainer must hand over its Stage and optimizer keywords, else it is refused rather
    # than train a whole copy of the model on every pp rank.
    with pytest.raises(ConfigError, match="parallel.pp=2: the critic trainer does not run the pipeline engine"):
        build_engine(ParallelConfig(pp=2), lambda: built.append(3), lambda m: None, "value", "critic")
    assert built == [1]


def test_micro_batches_under_pp_cover_the_rows_once():
    assert micro_batch_count(ParallelConfig()) == 1
    assert micro_batch_count(ParallelConfig(pp=2)) == 2
    assert micro_batch_count(ParallelConfig(pp=2, pp_microbatches=4)) == 4
    micro = {"ids_BT": torch.arange(10).reshape(5, 2), "mask_BT": torch.ones(5, 2)}
    parts = split_rows(micro, 4)
    assert [p["ids_BT"].shape[0] for p in parts] == [2, 1, 1, 1]
    assert torch.equal(torch.cat([p["ids_BT"] for p in parts]), micro["ids_BT"])
    assert [p["ids_BT"].shape[0] for p in split_rows(micro, 8)].count(0) == 3  # fewer rows than micro-batches
    assert split_rows(micro, 1) == [micro]
