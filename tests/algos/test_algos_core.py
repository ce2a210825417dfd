import math

import pytest
import torch

from moslim_mega.algos.core import (
    AlgoError,
    NonFiniteError,
    check_finite,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

NAN = float("nan")


def test_masked_sum_and_mean_hand_case_and_masked_nan_does_not_leak():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, NAN, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, mask).item() == 13.0
    assert masked_mean(x, mask).item() == 13.0 / 4
    assert torch.equal(masked_sum(x, mask, dim=1), torch.tensor([3.0, 10.0]))
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    assert torch.equal(masked_mean(x, mask.bool(), dim=0), torch.tensor([2.5, 2.0, 6.0]))


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    out = masked_mean(x, torch.zeros(2))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2))


def test_masked_var_hand_case_biased_and_unbiased():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    with pytest.raises(AlgoError, match="mask"):
        masked_var(x, torch.tensor([0, 1, 0, 0]))


def test_masked_whiten_gives_mean_zero_std_one_over_the_mask_and_zero_outside():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 9)
    mask[0, 2:7] = 1
    mask[1, :9] = 1
    mask[2, 4:5] = 1
    mask[3, 1:4] = 1
    x[mask == 0] = 1e6  # garbage outside the mask must not shift the statistics
    w = masked_whiten(x, mask)
    vals = w[mask == 1]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert vals.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-7)
    assert torch.all(w[mask == 0] == 0)
    # shift_mean=False rescales only: the masked mean is kept.
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert w2[mask == 1].mean().item() == pytest.approx(x[mask == 1].mean().item(), rel=1e-12)
    assert w2[mask == 1].std().item() == pytest.approx(1.0, abs=1e-7)


def test_check_finite_names_step_and_quantity():
    check_finite(torch.tensor([1.0, -2.0]), "rewards", step=3)  # finite: no error
    with pytest.raises(NonFiniteError, match=r"^step 7: advantages is not finite$"):
        check_finite(torch.tensor([1.0, NAN]), "advantages", step=7)
    with pytest.raises(RuntimeError, match="step 0: policy loss is not finite"):
        check_finite(torch.tensor(math.inf), "policy loss", step=0)
