"""Dispatch rules, input checks, and the chunked plain-PyTorch path (what CPU runs by default)."""

import pytest
import torch

from moslim_mega.algos.logprob import chunked_linear_logprob_entropy
from moslim_mega.kernels import KernelError, resolve_impl
from moslim_mega.kernels.linear_logprob import fused_linear_logprob, linear_logprob_reference
from moslim_mega.kernels.multihead_head import fused_multihead_head, fused_multihead_reward
from moslim_mega.reward.mapping import MappingError, RewardMapper, RunningClassStats


def test_resolve_impl_auto_env_and_errors(monkeypatch):
    monkeypatch.delenv("MOSLIM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_impl(None, cpu) == "reference"
    assert resolve_impl("auto", cpu) == "reference"
    with pytest.raises(KernelError, match="TRITON_INTERPRET"):
        resolve_impl("triton", cpu)
    monkeypatch.setenv("MOSLIM_KERNELS", "triton")
    with pytest.raises(KernelError, match="MOSLIM_KERNELS"):
        resolve_impl(None, cpu)
    with pytest.raises(KernelError, match="MOSLIM_KERNELS"):
        resolve_impl("auto", cpu)  # kernels.impl=auto leaves the choice to the variable
    assert resolve_impl("reference", cpu) == "reference"  # an explicit argument wins over the env
    monkeypatch.setenv("MOSLIM_KERNELS", "reference")
    assert resolve_impl("auto", cpu) == "reference"
    monkeypatch.setenv("MOSLIM_KERNELS", "fast")
    with pytest.raises(KernelError, match="MOSLIM_KERNELS: 'fast'"):
        resolve_impl(None, cpu)


def _materialised(hidden, weight, targets, temperature, ignore_index=-100):
    """Written here, independently of the package: full N×V logits → log_softmax gathered at the
    target, entropy −Σ p log p of the full softmax; ignored rows give 0 (and so no gradient)."""
    logp_NV = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    valid = targets != ignore_index
    lp = logp_NV.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    ent = -(logp_NV.exp() * logp_NV).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _values_and_grads(fn, hidden, weight, targets):
    """(log p, entropy, dL/dhidden, dL/dweight) for L = Σ log p + 2·Σ entropy."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    lp, ent = fn(h, w, targets)
    (lp.sum() + 2 * ent.sum()).backward()
    return [lp.detach(), ent.detach(), h.grad, w.grad]


@pytest.mark.parametrize("chunk", [16, 32, 70, 8192])
def test_reference_path_matches_materialising_and_repo_chunked(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = 3 * torch.randn(13, 24, generator=gen, dtype=torch.float64)  # peaked softmaxes, not near-uniform
    weight = torch.randn(70, 24, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 70, (13,), generator=gen)
    targets[[2, 5]] = -100
    want = _values_and_grads(lambda h, w, t: _materialised(h, w, t, 1.3), hidden, weight, targets)
    fused = _values_and_grads(lambda h, w, t: fused_linear_logprob(h, w, t, 1.3, chunk_size=chunk), hidden, weight,
                              targets)
    for a, b in zip(fused, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The algos-side entry point (what the trainer calls) and the kernels' own reference agree too.
    valid = targets.clamp(min=0)
    chunked = _values_and_grads(lambda h, w, t: chunked_linear_logprob_entropy(h, w, t, 1.3, chunk_size=chunk),
                                hidden, weight, valid)
    plain = _values_and_grads(lambda h, w, t: _materialised(h, w, t, 1.3), hidden, weight, valid)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ref_lp, ref_ent = linear_logprob_reference(hidden, weight, targets, 1.3)
    torch.testing.assert_close(ref_lp, want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref_ent, want[1], rtol=1e-10, atol=1e-10)
    # Ignored rows: 0 outputs and no gradient; the others do get one.
    lp, ent, g_h = fused[0], fused[1], fused[2]
    assert lp[2] == 0 and ent[5] == 0 and (g_h[[2, 5]] == 0).all() and g_h[0].abs().sum() > 0
    assert (lp[targets != -100] < 0).all() and (ent[targets != -100] > 0).all()


def test_bad_inputs_name_the_argument():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(KernelError, match="targets_N: token id 10"):
        fused_linear_logprob(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(KernelError, match="weight_VH: dtype"):
        fused_linear_logprob(h, w.double(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(KernelError, match="temperature"):
        fused_linear_logprob(h, w, torch.tensor([0, 1, 2, 3]), temperature=0.0)
    k = (5, 3)
    hw, b = torch.randn(8, 8), torch.zeros(8)
    with pytest.raises(KernelError, match=r"labels_BH\[:, 1\] \(head 1\): value 3"):
        fused_multihead_head(torch.randn(2, 8), hw, b, k, torch.tensor([[0, 0], [4, 3]]))
    with pytest.raises(KernelError, match="weight_CD"):
        fused_multihead_head(torch.randn(2, 8), torch.randn(7, 8), b, k, torch.tensor([[0, 0], [4, 2]]))
    mapper = RewardMapper(RunningClassStats(k))  # zscore with no statistics recorded
    with pytest.raises(MappingError, match="stats: no examples"):
        mapper.head_rewards(torch.randn(2, 8), hw, b, k, torch.tensor([[0, -1], [4, 2]]))
    with pytest.raises(KernelError, match="mean_C"):
        fused_multihead_reward(torch.randn(2, 8), hw, b, k, torch.tensor([[0, -1], [4, 2]]), kind="zscore")


@pytest.mark.parametrize("kind", ["zscore", "logprob", "neg_abs_dist"])
@pytest.mark.parametrize("normalize_by,clip", [("all", 0.0), ("named", 0.3)])
def test_reward_reference_on_plain_values_is_the_mappers_own_numbers(kind, normalize_by, clip):
    # The kernel takes the mapping as plain values; on CPU (the reference path) what the RM scores
    # with must stay bit for bit what RewardMapper computes from the head's probabilities.
    k = (5, 3, 2)
    g = torch.Generator().manual_seed(7)
    hidden, weight, bias = torch.randn(17, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10, generator=g)
    stats = RunningClassStats(k)
    stats.update([torch.softmax(torch.randn(40, n, generator=g), 1) for n in k])
    stats.update([torch.full((1, 2), 0.5) if n == 2 else torch.softmax(torch.randn(1, n, generator=g), 1) for n in k])
    targets = torch.stack([torch.randint(-1, n, (17,), generator=g) for n in k], 1)
    targets[0] = -1
    mapper = RewardMapper(stats, kind=kind, normalize_by=normalize_by, std_floor=0.05, clip=clip)
    probs_BC, reward_B = mapper.head_rewards(hidden, weight, bias, k, targets, impl="reference")
    logits = torch.split(torch.nn.functional.linear(hidden, weight, bias), list(k), dim=-1)
    probs = [torch.softmax(z.float(), dim=-1) for z in logits]
    assert torch.equal(probs_BC, torch.cat(probs, 1))
    assert torch.equal(reward_B, mapper(probs, targets))
    assert reward_B[0] == 0 and reward_B.abs().sum() > 0
    with pytest.raises(MappingError, match="num_classes"):
        mapper.head_rewards(hidden, weight[:9], bias[:9], (5, 3, 1), targets)
