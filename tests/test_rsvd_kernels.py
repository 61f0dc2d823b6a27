"""Kernels of the randomized SVD: the in-kernel Gaussian sketch, the fused power pass (Triton), and
the batched one-sided Jacobi SVD of the small factor (reference port and CUDA kernel)."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, INTERPRET, assert_rms_close

triton_only = pytest.mark.triton


def _rsvd_kernels():
    from fastmodels.kernels import rsvd

    return rsvd


# ----------------------------------------------------------------------------------------------
# sketch_omega / sketch_matmul
# ----------------------------------------------------------------------------------------------

SKETCH_CASES = [
    # (b, m, n, l)
    (1, 5, 37, 3),
    (3, 37, 5, 16),
    (3, 70, 37, 20),
    (1, 37, 70, 16),
    (3, 1, 5, 1),
]


@triton_only
@pytest.mark.parametrize("b,m,n,l", SKETCH_CASES)
@pytest.mark.parametrize("transpose", [False, True], ids=["AO", "AtO"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sketch_matmul_is_a_times_omega(device, b, m, n, l, transpose, dtype):
    k = _rsvd_kernels()
    A = torch.randn(b, m, n, device=device).to(dtype)
    Y = k.sketch_matmul(A, l, 1234, transpose=transpose)
    rows = m if transpose else n
    assert Y.shape == (b, n if transpose else m, l) and Y.dtype == torch.float32
    omega = k.sketch_omega(b, rows, l, 1234, device)
    assert omega.shape == (b, rows, l) and omega.dtype == torch.float32
    opA = A.transpose(1, 2) if transpose else A
    # fp16 A: the kernel multiplies fp16 operands (Omega rounded to fp16) with fp32 accumulation, so the
    # products are exact and only the fp32 summation differs from float64.
    om = omega if dtype == torch.float32 else omega.to(dtype)
    ref = opA.double() @ om.double()
    assert_rms_close(Y, ref, 2e-6, "Y")


@triton_only
def test_sketch_matmul_bf16(device):
    k = _rsvd_kernels()
    A = torch.randn(3, 37, 20, device=device)
    Ab = A.bfloat16()
    for transpose in (False, True):
        Y = k.sketch_matmul(Ab, 20, 5, transpose=transpose)
        omega = k.sketch_omega(3, 37 if transpose else 20, 20, 5, device)
        opA = Ab.transpose(1, 2) if transpose else Ab
        ref = opA.double() @ omega.double()
        # On GPU Omega is rounded to bf16 for tl.dot (rms error ~ bf16 unit roundoff 2**-9); under the
        # interpreter the product is exact in fp32.
        assert_rms_close(Y, ref, 6e-3 if DEVICE == "cuda" else 2e-6, "Y")


@triton_only
def test_sketch_is_deterministic_and_keyed_by_seed_and_matrix(device):
    k = _rsvd_kernels()
    A = torch.randn(3, 37, 20, device=device)
    Y1 = k.sketch_matmul(A, 16, 99)
    Y2 = k.sketch_matmul(A, 16, 99)
    assert torch.equal(Y1, Y2)
    Y3 = k.sketch_matmul(A, 16, 100)
    assert not torch.allclose(Y1, Y3, atol=1e-2)
    om = k.sketch_omega(3, 20, 16, 99, device)
    # Different matrix index -> different (uncorrelated) Omega.
    for i, j in ((0, 1), (0, 2), (1, 2)):
        corr = torch.corrcoef(torch.stack([om[i].flatten(), om[j].flatten()]))[0, 1].abs().item()
        assert corr < 0.2, (i, j, corr)
    # Omega_i depends on (seed, i, row, col) only: not on the batch size, nor on l's padding/tiling.
    assert torch.equal(k.sketch_omega(1, 20, 16, 99, device)[0], om[0])
    # Seeds are taken modulo 2**32 (the Philox key's low word).
    assert torch.equal(k.sketch_omega(2, 20, 16, 99 + 2**32, device), om[:2])
    # seed 0 / matrix 1 must not equal seed 1 / matrix 0 (the matrix index is a separate key word).
    assert not torch.allclose(k.sketch_omega(2, 20, 16, 0, device)[1], k.sketch_omega(1, 20, 16, 1, device)[0])


@triton_only
def test_omega_statistics(device):
    scipy_stats = pytest.importorskip("scipy.stats")
    k = _rsvd_kernels()
    om = k.sketch_omega(2, 300, 40, 2024, device).double().cpu()
    x = om.flatten()
    N = x.numel()  # 24000
    assert abs(x.mean().item()) < 4 / math.sqrt(N)
    assert abs(x.std().item() - 1) < 4 * math.sqrt(2 / N)
    kurt = ((x - x.mean()) ** 4).mean().item() / x.var().item() ** 2
    assert abs(kurt - 3) < 0.25
    assert scipy_stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    # Columns of one Omega are uncorrelated: off-diagonal of the sample correlation ~ N(0, 1/300).
    c = torch.corrcoef(om[0].T)
    off = c - torch.diag(torch.diag(c))
    assert off.abs().max().item() < 5 / math.sqrt(300)


@triton_only
def test_sketch_matmul_edge_cases_and_errors(device):
    k = _rsvd_kernels()
    Y = k.sketch_matmul(torch.randn(2, 4, 0, device=device), 3, 0)
    assert Y.shape == (2, 4, 3) and torch.equal(Y, torch.zeros_like(Y))
    assert k.sketch_matmul(torch.randn(0, 4, 5, device=device), 3, 0).shape == (0, 4, 3)
    with pytest.raises(TypeError, match="A must be"):
        k.sketch_matmul(torch.randn(1, 4, 5, device=device).double(), 3, 0)
    with pytest.raises(ValueError, match="contiguous"):
        k.sketch_matmul(torch.randn(1, 5, 4, device=device).transpose(1, 2), 3, 0)
    with pytest.raises(ValueError, match="3-D"):
        k.sketch_matmul(torch.randn(4, 5, device=device), 3, 0)
    with pytest.raises(ValueError, match="l must be"):
        k.sketch_matmul(torch.randn(1, 4, 5, device=device), 0, 0)
    with pytest.raises(TypeError, match="seed"):
        k.sketch_matmul(torch.randn(1, 4, 5, device=device), 3, 1.5)


# ----------------------------------------------------------------------------------------------
# power_pass
# ----------------------------------------------------------------------------------------------

POWER_CASES = [
    # (b, m, n, l)
    (1, 5, 37, 3),
    (3, 37, 70, 20),
    (3, 70, 5, 16),
    (1, 70, 37, 33),
]
# RMS-relative error against float64 on the same (rounded) A: fp32 is limited by summation order; for
# fp16/bf16 the kernel rounds Y and W = A^T Y to A's dtype for tl.dot on GPU (a few unit roundoffs).
POWER_TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@triton_only
@pytest.mark.parametrize("b,m,n,l", POWER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_power_pass_matches_float64(device, b, m, n, l, dtype):
    k = _rsvd_kernels()
    A = torch.randn(b, m, n, device=device).to(dtype)
    Y = torch.randn(b, m, l, device=device)
    Z = k.power_pass(A, Y)
    assert Z.shape == (b, m, l) and Z.dtype == torch.float32
    A64 = A.double()
    ref = A64 @ (A64.transpose(1, 2) @ Y.double())
    assert_rms_close(Z, ref, POWER_TOL[dtype], "Z")
    if dtype == torch.float16:
        # The fp16 error really is the operand rounding: emulate it and the kernel must match closely.
        W = (A64.transpose(1, 2) @ Y.half().double()).float().half().double()
        assert_rms_close(Z, A64 @ W, 1e-4, "Z (emulated fp16 operands)")


@triton_only
def test_power_pass_splits_are_deterministic(device):
    k = _rsvd_kernels()
    A = torch.randn(2, 37, 150, device=device)
    Y = torch.randn(2, 37, 20, device=device)
    ref = A.double() @ (A.double().transpose(1, 2) @ Y.double())
    for s in (1, 2, 3, 100):
        Z = k.power_pass(A, Y, num_splits=s)
        assert_rms_close(Z, ref, 2e-6, f"Z (num_splits={s})")
        assert torch.equal(Z, k.power_pass(A, Y, num_splits=s))  # bit-identical on repeat
    assert torch.equal(k.power_pass(A, Y), k.power_pass(A, Y))


@triton_only
def test_power_pass_large_l_is_tiled(device):
    # l > 128 uses several column tiles of Y (a third grid axis).
    k = _rsvd_kernels()
    A = torch.randn(1, 16, 20, device=device)
    Y = torch.randn(1, 16, 130, device=device)
    ref = A.double() @ (A.double().transpose(1, 2) @ Y.double())
    assert_rms_close(k.power_pass(A, Y), ref, 2e-6, "Z")


@triton_only
def test_power_pass_edge_cases_and_errors(device):
    k = _rsvd_kernels()
    Z = k.power_pass(torch.randn(2, 4, 0, device=device), torch.randn(2, 4, 3, device=device))
    assert torch.equal(Z, torch.zeros(2, 4, 3, device=device))
    assert k.power_pass(torch.randn(2, 0, 5, device=device), torch.randn(2, 0, 3, device=device)).shape == (2, 0, 3)
    A = torch.randn(2, 4, 5, device=device)
    with pytest.raises(ValueError, match="Y must be"):
        k.power_pass(A, torch.randn(2, 5, 3, device=device))
    with pytest.raises(TypeError, match="Y must be float32"):
        k.power_pass(A, torch.randn(2, 4, 3, device=device).double())
    with pytest.raises(TypeError, match="A must be"):
        k.power_pass(A.to(torch.int32), torch.randn(2, 4, 3, device=device))
