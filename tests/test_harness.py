"""The test harness itself: assert helpers fail when they must, and poisoning really poisons."""

import pytest
import torch

from fastmodels.testing import assert_close, assert_rms_close, lowp_error_budget, rms_ratio


def test_poisoned_allocations_are_nan():
    assert torch.isnan(torch.empty(5)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, 2))).all()
    assert (torch.empty(4, dtype=torch.int32) == -1).all()


@pytest.mark.no_poison
def test_no_poison_marker():
    # the marker leaves torch's own allocators in place (the poisoning fixture wraps them)
    assert torch.empty is torch._C._VariableFunctions.empty
    assert torch.empty_like is torch._C._VariableFunctions.empty_like


def test_rms_ratio_and_nan_detection():
    ref = torch.randn(100, dtype=torch.float64)
    assert rms_ratio(ref, ref) == 0.0
    noisy = ref + 1e-3 * torch.randn(100, dtype=torch.float64)
    assert 1e-4 < rms_ratio(noisy, ref) < 1e-2
    assert_rms_close(noisy, ref, 1e-2)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_rms_close(noisy, ref, 1e-5)
    out = ref.clone()
    out[7] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rms_close(out, ref, 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_rms_close(ref[:5], ref, 1.0)


def test_assert_close_report():
    ref = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    out = ref.float().clone()
    assert_close(out, ref, dtype=torch.float32)
    out[2, 1] += 0.5
    with pytest.raises(AssertionError, match=r"1 of 12 elements mismatch(.|\n)*worst at \[2, 1\]"):
        assert_close(out, ref, dtype=torch.float32)
    out = ref.float().clone()
    out[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="mismatch"):
        assert_close(out, ref)


def test_lowp_error_budget():
    ref = torch.randn(1000, dtype=torch.float64)
    lowp = ref.to(torch.bfloat16)
    lowp_error_budget(ref.to(torch.bfloat16), ref, lowp)
    with pytest.raises(AssertionError, match="exceeds"):
        lowp_error_budget((ref * 1.1).to(torch.bfloat16), ref, lowp)
