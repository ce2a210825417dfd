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


def test_reference_path_matches_materialising_and_repo_chunked():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 24, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(70, 24, generator=gen, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 70, (13,), generator=gen)
    lp, ent = fused_linear_logprob(hidden, weight, targets, 1.3, chunk_size=16)
    (lp.sum() + 2 * ent.sum()).backward()
    got = [lp, ent, hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    lp2, ent2 = chunked_linear_logprob_entropy(hidden, weight, targets, 1.3, chunk_size=32)
    (lp2.sum() + 2 * ent2.sum()).backward()
    for a, b in zip(got, [lp2, ent2, hidden.grad, weight.grad]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-10)
    # ignore_index rows: 0 outputs and no gradient, the other rows unchanged
    targets[[2, 5]] = -100
    hidden.grad = None
    lp3, ent3 = fused_linear_logprob(hidden, weight, targets, 1.3, chunk_size=16)
    (lp3.sum() + ent3.sum()).backward()
    ref_lp, ref_ent = linear_logprob_reference(hidden.detach(), weight.detach(), targets, 1.3)
    torch.testing.assert_close(lp3.detach(), ref_lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent3.detach(), ref_ent, rtol=1e-10, atol=1e-10)
    assert lp3[2] == 0 and ent3[5] == 0 and (hidden.grad[[2, 5]] == 0).all() and hidden.grad[0].abs().sum() > 0


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
        fused_multihead_reward(torch.randn(2, 8), hw, b, k, torch.tensor([[0, -1], [4, 2]]), mapper)
