"""Kernels of the randomized SVD: the in-kernel Gaussian sketch, the fused power pass (Triton), and
the batched one-sided Jacobi SVD of the small factor (reference port and CUDA kernel)."""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, assert_rms_close, load_cuda_emulation

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
    # tile multiples (BM = BK = 16 under the interpreter): the unmasked path, EVEN_M only, EVEN_K only
    (2, 32, 48, 20),
    (1, 32, 37, 5),
    (1, 37, 32, 5),
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


@triton_only
def test_wide_sketches_span_several_column_tiles(device):
    """l > 128 (rank 512 on a GPU takes l = 768): the sketch and the power pass tile l over a
    grid axis, and each column tile must use its own columns of Omega and of Y. Omega's Philox
    counters give every row its own ceil(l / 4) groups of four normals, so no two entries of one
    Omega coincide (a stride of l // 4 made rows share groups when l % 4 != 0)."""
    k = _rsvd_kernels()
    for l in (5, 150):
        om = k.sketch_omega(1, 20, l, 7, device)
        assert om.unique().numel() == om.numel(), f"l={l}: repeated normals in Omega"
    A = torch.randn(2, 20, 24, device=device)
    for transpose in (False, True):
        Y = k.sketch_matmul(A, 150, 7, transpose=transpose)
        opA = A.transpose(1, 2) if transpose else A
        ref = opA.double() @ k.sketch_omega(2, opA.shape[2], 150, 7, device).double()
        assert_rms_close(Y, ref, 2e-6, f"Y (transpose={transpose})")
    Y = torch.randn(2, 20, 150, device=device)
    ref = A.double() @ (A.double().transpose(1, 2) @ Y.double())
    for deterministic in (True, False):
        assert_rms_close(k.power_pass(A, Y, deterministic=deterministic), ref, 2e-6, "Z")


# ----------------------------------------------------------------------------------------------
# power_pass
# ----------------------------------------------------------------------------------------------

POWER_CASES = [
    # (b, m, n, l); under the interpreter the tile is 16 x 16, so the last three take the kernel's
    # unmasked paths (m and n multiples of the tile, m only, n only)
    (1, 5, 37, 3),
    (3, 37, 70, 20),
    (3, 70, 5, 16),
    (1, 70, 37, 33),
    (2, 32, 48, 20),
    (1, 32, 37, 5),
    (1, 37, 32, 5),
]
# RMS-relative error against float64 on the same (rounded) A: fp32 is limited by summation order; for
# fp16/bf16 the kernel rounds Y and W = A^T Y to A's dtype for tl.dot on GPU (a few unit roundoffs).
POWER_TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@triton_only
@pytest.mark.parametrize("b,m,n,l", POWER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["splitk", "atomic"])
def test_power_pass_matches_float64(device, b, m, n, l, dtype, deterministic):
    k = _rsvd_kernels()
    A = torch.randn(b, m, n, device=device).to(dtype)
    Y = torch.randn(b, m, l, device=device)
    Z = k.power_pass(A, Y, deterministic=deterministic)
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
    assert_rms_close(k.power_pass(A, Y, deterministic=False), ref, 2e-6, "Z (atomic)")


@triton_only
def test_atomic_passes_follow_torch_deterministic_algorithms(device, monkeypatch, deterministic_algorithms):
    """FASTMODELS_RSVD_PASSES=atomic under torch.use_deterministic_algorithms(True): an error (a
    warning with warn_only), as for torch's ops without a deterministic implementation; the
    default passes are deterministic and run."""
    from fastmodels.ops import randomized_svd

    A = torch.randn(2, 40, 30, device=device)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's condition for deterministic cuBLAS GEMMs
    deterministic_algorithms(True)
    randomized_svd(A, 3, seed=0, backend="triton")
    monkeypatch.setenv("FASTMODELS_RSVD_PASSES", "atomic")
    with pytest.raises(RuntimeError, match="FASTMODELS_RSVD_PASSES=atomic sums with fp32 atomics.*set FASTMODELS_RSVD_PASSES to auto"):
        randomized_svd(A, 3, seed=0, backend="triton")
    deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="FASTMODELS_RSVD_PASSES=atomic"):
        U, S, V = randomized_svd(A, 3, seed=0, backend="triton")
    assert torch.isfinite(S).all()


@triton_only
def test_power_pass_large_l_is_tiled(device):
    # l > 128 uses several column tiles of Y (a third grid axis).
    k = _rsvd_kernels()
    A = torch.randn(1, 16, 20, device=device)
    Y = torch.randn(1, 16, 130, device=device)
    ref = A.double() @ (A.double().transpose(1, 2) @ Y.double())
    assert_rms_close(k.power_pass(A, Y), ref, 2e-6, "Z")
    assert_rms_close(k.power_pass(A, Y, deterministic=False), ref, 2e-6, "Z (atomic)")


@triton_only
def test_power_pass_edge_cases_and_errors(device):
    k = _rsvd_kernels()
    for det in (True, False):
        Z = k.power_pass(torch.randn(2, 4, 0, device=device), torch.randn(2, 4, 3, device=device), deterministic=det)
        assert torch.equal(Z, torch.zeros(2, 4, 3, device=device))
    assert k.power_pass(torch.randn(2, 0, 5, device=device), torch.randn(2, 0, 3, device=device)).shape == (2, 0, 3)
    A = torch.randn(2, 4, 5, device=device)
    with pytest.raises(ValueError, match="Y must be"):
        k.power_pass(A, torch.randn(2, 5, 3, device=device))
    with pytest.raises(TypeError, match="Y must be float32"):
        k.power_pass(A, torch.randn(2, 4, 3, device=device).double())
    with pytest.raises(TypeError, match="A must be"):
        k.power_pass(A.to(torch.int32), torch.randn(2, 4, 3, device=device))


@triton_only
def test_grid_limits(device, monkeypatch):
    """Batches beyond the kernels' launch grids (65535 matrices, sides of 16 * 65535) are a clear
    error for the kernels, and randomized_svd takes the torch matmuls for them instead."""
    from fastmodels.ops import randomized_svd

    k = _rsvd_kernels()
    assert k.grid_ok(80, 8192, 28672) and not k.grid_ok(65536, 4, 4) and not k.grid_ok(1, 2_000_000, 8)
    with pytest.raises(ValueError, match="at most 65535 matrices"):
        k.power_pass(torch.zeros(65536, 1, 1, device=device), torch.zeros(65536, 1, 1, device=device))
    A = torch.randn(3, 20, 30, device=device)
    kernel_route = randomized_svd(A, 3, seed=1, backend="triton")
    monkeypatch.setattr(k, "_MAX_GRID_YZ", 2)  # pretend a batch of 3 is beyond the grid
    fallback = randomized_svd(A, 3, seed=1, backend="triton")
    reference = randomized_svd(A, 3, seed=1, backend="reference")
    for got, want in zip(fallback, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(kernel_route.U, reference.U)  # the kernels draw another sketch


# ----------------------------------------------------------------------------------------------
# Rayleigh-Ritz products of the kernel backends: low-precision A times an fp32 basis
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 2.0**-17), (torch.float16, 2.0**-20)], ids=["bf16", "fp16"])
def test_hi_lo_product_is_fp32_accurate(dtype, bound):
    """_bmm_hi_lo(X, Q): X (bf16/fp16, exact) times an fp32 Q to ~2^-16 (bf16) / 2^-22 (fp16)
    relative, where one low-precision GEMM with Q rounded would be off by 2^-9 / 2^-12."""
    from fastmodels.ops.rsvd import _bmm_f32, _bmm_hi_lo

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 37, 70, generator=g).to(dtype).to(DEVICE)
    Q = torch.linalg.qr(torch.randn(3, 70, 13, generator=g, dtype=torch.float64)).Q.float().to(DEVICE)
    exact = X.double() @ Q.double()
    Z = _bmm_hi_lo(X, Q)
    assert Z.dtype == torch.float32 and Z.shape == (3, 37, 13)
    err = ((Z.double() - exact).norm() / exact.norm()).item()
    assert err < bound, err
    rounded = ((_bmm_f32(X, Q).double() - exact).norm() / exact.norm()).item()  # Q rounded to X's dtype
    assert rounded > 16 * err


# ----------------------------------------------------------------------------------------------
# jacobi_svd: reference port of the CUDA sweeps (CPU), the CUDA kernel (GPU), its compilation
# ----------------------------------------------------------------------------------------------


def _jacobi():
    from fastmodels.ops import _jacobi

    return _jacobi


def _check_svd(B, U, S, V, *, tol=2e-6):
    """Reconstruction, singular values vs float64 LAPACK, orthonormality, order, sign convention."""
    b, r, c = B.shape
    k = min(r, c)
    assert U.shape == (b, r, k) and S.shape == (b, k) and V.shape == (b, c, k)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    for t in (U, S, V):
        assert torch.isfinite(t).all()
    B64, U64, S64, V64 = B.double().cpu(), U.double().cpu(), S.double().cpu(), V.double().cpu()
    scale = torch.linalg.matrix_norm(B64, ord=2).clamp_min(1e-300)[:, None]
    S_ref = torch.linalg.svdvals(B64)
    assert ((S64 - S_ref).abs() / scale).max().item() <= tol, "singular values"
    assert (S64[:, :-1] >= S64[:, 1:]).all(), "not descending"
    rec = U64 @ torch.diag_embed(S64) @ V64.transpose(1, 2)
    assert ((rec - B64).abs().amax(dim=(1, 2)) / scale[:, 0]).max().item() <= tol * 4, "reconstruction"
    eye = torch.eye(k, dtype=torch.float64)
    nonzero = S64 > 0
    for name, X in (("U", U64), ("V", V64)):
        gram = X.transpose(1, 2) @ X
        # columns of exactly-zero singular values on the long side are zero (documented)
        mask = (nonzero[:, :, None] & nonzero[:, None, :]) | torch.eye(k, dtype=torch.bool)
        err = torch.where(mask, gram - eye, 0.0)
        long_side_zero = (name == "U") == (r >= c)
        if long_side_zero:
            err = torch.where(nonzero[:, :, None] | ~torch.eye(k, dtype=torch.bool), err, 0.0)
        assert err.abs().max().item() <= tol, f"{name} orthonormality"
    # sign convention: the largest-|.| entry of each U column (first on ties) is >= 0
    if r > 0:
        pick = torch.gather(U64, 1, U64.abs().argmax(dim=1, keepdim=True))
        assert (pick >= 0).all()


JACOBI_SHAPES = [(3, 7, 5), (2, 5, 9), (1, 1, 6), (2, 6, 1), (1, 1, 1), (1, 40, 40), (2, 33, 20), (1, 17, 45)]


def test_round_robin_pairs_cover_every_pair_once():
    import itertools

    J = _jacobi()
    for k in range(0, 14):
        seen = []
        for ps, qs in J.round_robin_pairs(k):
            assert len(set(ps + qs)) == len(ps + qs), "pairs of a round must be disjoint"
            assert all(p < q < k for p, q in zip(ps, qs))
            seen += list(zip(ps, qs))
        assert sorted(seen) == sorted(itertools.combinations(range(k), 2))


@pytest.mark.parametrize("b,r,c", JACOBI_SHAPES, ids=[f"{b}x{r}x{c}" for b, r, c in JACOBI_SHAPES])
def test_jacobi_reference_matches_lapack(b, r, c):
    B = torch.randn(b, r, c)
    _check_svd(B, *_jacobi().jacobi_svd(B, "reference"))


def _with_spectrum(b, r, c, sv):
    k = min(r, c)
    Q1 = torch.linalg.qr(torch.randn(b, r, k, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(b, c, k, dtype=torch.float64)).Q
    return (Q1 @ torch.diag_embed(sv.expand(b, k)) @ Q2.transpose(1, 2)).float()


def test_jacobi_reference_ill_conditioned():
    J = _jacobi()
    sv = torch.logspace(0, -10, 24, dtype=torch.float64)  # kappa 1e10
    for r, c in ((30, 24), (24, 37)):
        B = _with_spectrum(2, r, c, sv)
        U, S, V = J.jacobi_svd(B, "reference")
        _check_svd(B, U, S, V)
        # the large singular values are resolved to fp32 precision
        S_ref = torch.linalg.svdvals(B.double())
        assert ((S.double()[:, :8] - S_ref[:, :8]).abs() / S_ref[:, :8]).max() < 1e-5


def test_jacobi_reference_rank_deficient_and_zero():
    J = _jacobi()
    for r, c in ((12, 9), (9, 12), (10, 10)):
        B = (torch.randn(2, r, 3) @ torch.randn(2, 3, c)).contiguous()
        U, S, V = J.jacobi_svd(B, "reference")
        _check_svd(B, U, S, V)
        assert (S[:, 3:] <= 1e-5 * S[:, :1]).all()
    for r, c in ((5, 4), (4, 6)):
        B = torch.zeros(2, r, c)
        U, S, V = J.jacobi_svd(B, "reference")
        assert torch.equal(S, torch.zeros(2, min(r, c)))
        _check_svd(B, U, S, V)
        short = V if r >= c else U
        assert torch.equal(short, torch.eye(min(r, c)).expand_as(short))


def test_jacobi_reference_batched_equals_looped_and_is_deterministic():
    J = _jacobi()
    B = torch.randn(4, 11, 8)
    B[2] = torch.randn(11, 2) @ torch.randn(2, 8)  # converges at a different sweep than the others
    U, S, V = J.jacobi_svd(B, "reference")
    for i in range(4):
        Ui, Si, Vi = J.jacobi_svd(B[i : i + 1].clone(), "reference")
        torch.testing.assert_close(Si, S[i : i + 1], rtol=0, atol=1e-6 * S[i, 0].item())
        assert_rms_close(Ui @ torch.diag_embed(Si) @ Vi.mT, B[i : i + 1], 2e-6)
        # the rotations of a converged matrix are exact identities, so batching changes nothing
        torch.testing.assert_close(Ui, U[i : i + 1], rtol=0, atol=1e-6)
    U2, S2, V2 = J.jacobi_svd(B, "reference")
    assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(V, V2)


def test_jacobi_max_sweeps_bounds_work():
    J = _jacobi()
    B = torch.randn(1, 30, 30)
    U1, S1, V1 = J.jacobi_svd(B, "reference", max_sweeps=1)
    S_ref = torch.linalg.svdvals(B.double())
    # one sweep is not converged (the test would be vacuous otherwise) but is still a valid factorization
    assert (S1.double() - S_ref).abs().max() > 1e-4
    assert_rms_close(U1 @ torch.diag_embed(S1) @ V1.mT, B, 2e-6)


@pytest.fixture(scope="module")
def jacobi_emulation(tmp_path_factory):
    """csrc/cuda/jacobi_svd.cu compiled as C++ against the threaded block emulation (tests/cuda_emulation/)."""
    fn = load_cuda_emulation("jacobi_svd_emulation.cpp", tmp_path_factory.mktemp("emu")).fm_jacobi_svd_emulate
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_double, ctypes.c_int, ctypes.c_int]

    def run_kernel(B, use_shared, max_sweeps=15):
        b, r, c = B.shape
        k, L = min(r, c), max(r, c)
        nan = float("nan")
        U, S, V = torch.full((b, r, k), nan), torch.full((b, k), nan), torch.full((b, c, k), nan)
        work = torch.full((b, k * L + k * k + k), nan, dtype=torch.float64)
        fn(B.data_ptr(), U.data_ptr(), S.data_ptr(), V.data_ptr(), work.data_ptr(), b, r, c, 1e-8, max_sweeps,
           int(use_shared))
        return U, S, V

    return run_kernel


# Small shapes: the emulation runs 256 OS threads per block with a barrier per tournament round.
EMULATED_JACOBI = [(3, 7, 5), (2, 5, 9), (1, 6, 1), (1, 1, 6), (1, 1, 1), (1, 21, 14), (1, 12, 19)]


@pytest.mark.parametrize("use_shared", [1, 0], ids=["shared", "workspace"])
@pytest.mark.parametrize("b,r,c", EMULATED_JACOBI, ids=[f"{b}x{r}x{c}" for b, r, c in EMULATED_JACOBI])
def test_jacobi_cuda_source_under_emulation(jacobi_emulation, b, r, c, use_shared):
    """The CUDA kernel's own source (tournament rounds across 8 warps, warp-shuffle reductions,
    the shared-memory and the global-workspace layouts, sort and sign normalization) vs LAPACK and
    vs its PyTorch port; every output and the workspace start as NaN."""
    g = torch.Generator().manual_seed(b * 100 + r * 10 + c)
    B = torch.randn(b, r, c, generator=g)
    U, S, V = jacobi_emulation(B, use_shared)
    _check_svd(B, U, S, V)
    Ur, Sr, Vr = _jacobi().jacobi_svd(B, "reference")
    torch.testing.assert_close(S, Sr, rtol=0, atol=1e-6 * Sr.abs().max().item())


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_jacobi_is_scale_invariant(jacobi_emulation, scale):
    """The rotation test |gamma| > tol sqrt(alpha beta) compares a cosine with tol, so it must not
    depend on B's magnitude (the rSVD's small factor has A's scale): the reference port and the
    CUDA source both factor B * 1e4 and B * 1e-4 as well as B."""
    for r, c in ((9, 6), (5, 8)):
        B = (torch.randn(2, r, c, generator=torch.Generator().manual_seed(11)) * scale).contiguous()
        U, S, V = _jacobi().jacobi_svd(B, "reference")
        _check_svd(B, U, S, V)
        assert_rms_close(S, _jacobi().jacobi_svd(B / scale, "reference")[1].double() * scale, 1e-6, "S")
        _check_svd(B, *jacobi_emulation(B, 1))


def test_jacobi_cuda_source_under_emulation_rank_deficient_and_zero(jacobi_emulation):
    B = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(3)) @ torch.randn(1, 3, 8)
    U, S, V = jacobi_emulation(B.contiguous(), 1)
    _check_svd(B, U, S, V)
    assert (S[:, 3:] <= 1e-5 * S[:, :1]).all()
    for r, c in ((5, 4), (4, 6)):
        B = torch.zeros(1, r, c)
        U, S, V = jacobi_emulation(B, 0)
        assert torch.equal(S, torch.zeros(1, min(r, c)))
        _check_svd(B, U, S, V)
        short = V if r >= c else U
        assert torch.equal(short, torch.eye(min(r, c)).expand_as(short))


def test_jacobi_bad_input():
    J = _jacobi()
    with pytest.raises(TypeError, match="B must be float32"):
        J.jacobi_svd(torch.randn(1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="3-D"):
        J.jacobi_svd(torch.randn(3, 3))
    with pytest.raises(ValueError, match="at most 512"):
        J.jacobi_svd(torch.randn(1, 513, 2))
    with pytest.raises(ValueError, match="backend"):
        J.jacobi_svd(torch.randn(1, 3, 3), "magic")
    with pytest.raises(ValueError, match="max_sweeps"):
        J.jacobi_svd(torch.randn(1, 3, 3), max_sweeps=0)
    nan_column = torch.randn(2, 3, 3)
    nan_column[1, :, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        J.jacobi_svd(nan_column)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            J.jacobi_svd(torch.randn(1, 3, 3), "cuda")


CUDA_SHAPES = [(3, 7, 5), (2, 5, 9), (1, 1, 6), (2, 6, 1), (4, 64, 64), (3, 100, 37), (2, 37, 130), (2, 128, 128), (1, 512, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("b,r,c", CUDA_SHAPES, ids=[f"{b}x{r}x{c}" for b, r, c in CUDA_SHAPES])
def test_jacobi_cuda_matches_reference(b, r, c):
    J = _jacobi()
    B = torch.randn(b, r, c, device="cuda")
    U, S, V = J.jacobi_svd(B, "cuda")
    torch.cuda.synchronize()
    _check_svd(B, U, S, V)
    if r * c <= 130 * 130:  # the reference port is slow at 512 x 512 on the host
        Ur, Sr, Vr = J.jacobi_svd(B, "reference")
        torch.testing.assert_close(S, Sr, rtol=0, atol=2e-6 * Sr[:, :1].max().item())
        # same sweeps -> same vectors up to rounding (signs are normalized identically)
        gap = (Sr[:, :-1] - Sr[:, 1:]).abs().min().item() if min(r, c) > 1 else 1.0
        if gap > 1e-3 * Sr.max().item():
            torch.testing.assert_close(U, Ur, rtol=0, atol=1e-4)
            torch.testing.assert_close(V, Vr, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_jacobi_cuda_special_inputs():
    J = _jacobi()
    sv = torch.logspace(0, -10, 24, dtype=torch.float64)
    B = _with_spectrum(2, 30, 24, sv).cuda()
    _check_svd(B, *J.jacobi_svd(B, "cuda"))
    B = (torch.randn(2, 12, 3) @ torch.randn(2, 3, 9)).cuda()
    _check_svd(B, *J.jacobi_svd(B, "cuda"))
    B = torch.zeros(2, 5, 7, device="cuda")
    U, S, V = J.jacobi_svd(B, "cuda")
    assert torch.equal(S, torch.zeros_like(S)) and torch.isfinite(V).all() and torch.isfinite(U).all()


def test_jacobi_cuda_source_compiles():
    """CI's check: the .cu compiles with nvcc for sm_90, both as an object and as the shared library
    that fastmodels._cuda.load_library builds (skipped without nvcc)."""
    from fastmodels._cuda import csrc_dir, nvcc_flags
    from fastmodels._dispatch import nvcc_path

    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = csrc_dir() / "cuda" / "jacobi_svd.cu"
    inc = csrc_dir() / "include"
    out = Path(__import__("tempfile").mkdtemp()) / "jacobi_svd.o"
    cmd = [nvcc, "-O3", "-std=c++17", "-arch=sm_90", "-c", str(src), f"-I{inc}", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmd = [nvcc, *nvcc_flags("sm_90"), f"-I{inc}", "-shared", "-o", str(out.with_suffix(".so")), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-D", str(out.with_suffix(".so"))], capture_output=True, text=True).stdout
        assert "fastmodels_jacobi_svd_f32" in syms
