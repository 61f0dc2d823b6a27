"""Batched randomized truncated SVD (Halko-Martinsson-Tropp) for model editing.

Public functions:

* :func:`randomized_svd` -- ``A ~= U diag(S) V^T`` for a batch ``[..., m, n]`` or a list of 2-D
  matrices of any shapes, in two modes: ``method="accurate"`` (oversampling + power iterations
  chosen for a near-optimal residual) and ``method="torch_lowrank"`` (the semantics of
  ``torch.svd_lowrank(A, q=rank, niter=2)`` that LASER used, batched).
* :func:`low_rank` -- the rank-k approximation(s), several ranks from one factorization.
* :func:`singular_value_grads` -- ``dL/dsigma_i = u_i^T G v_i`` without forming ``U^T G V``.
* :func:`intruder_dimensions` -- top-k singular directions of a fine-tuned matrix (dense or a
  LoRA adapter ``(W_base, B, A, scale)`` never formed) that are far from every base direction.

Algorithm (all backends): sketch ``Y = A Omega``; ``q`` power passes ``Y = A (A^T orth(Y))``;
``Q = orth(Y)``; ``B^T = A^T Q``; ``B^T = Q_v R`` (CholeskyQR2); ``R = U_r S V_r^T`` (small SVD);
``U = Q V_r``, ``V = Q_v U_r``. Orthonormalization is CholeskyQR with a float64 Gram and float64
Cholesky (fp32 for the torch_lowrank mode on the CPU, as torch's own QR there), with a
Householder fallback for the matrices whose Gram is singular or whose result is not orthonormal
(rank-deficient, all-zero or very ill-conditioned blocks), so no input gives NaN.

Backends: ``reference`` (PyTorch; the sketch from a seeded ``torch.Generator``), ``triton``
(the Philox sketch and, for narrow sketches, the fused ``A (A^T Y)`` passes of
``fastmodels.kernels.rsvd``, else cuBLAS GEMMs -- see ``_passes_mode``; operands read in their own
precision with fp32 accumulation; the same torch orthonormalization) and
``cuda`` (the triton passes plus the CUDA batched one-sided Jacobi SVD for the small factor).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from fastmodels._autocast import autocast_off
from fastmodels._determinism import alert_not_deterministic
from fastmodels._dispatch import constant_under_compile, register_op, select_backend
from fastmodels._validation import FLOAT_DTYPES, check_choice, check_finite, check_float, check_int, check_tensor

__all__ = [
    "SVDResult",
    "IntruderDimensions",
    "randomized_svd",
    "low_rank",
    "singular_value_grads",
    "intruder_dimensions",
    "rsvd_reference",
    "default_oversample_niter",
    "EXACT_ROUTE_FRACTION",
]

_OP_INFO = register_op("randomized_svd", ("reference", "triton", "cuda"), cpu=("reference",), cuda=("triton", "reference"))

METHODS = ("accurate", "torch_lowrank")
# Above this fraction of min(m, n) a randomized sketch costs as much as an exact factorization:
# method="accurate" then takes the exact route (Gram + float64 eigh + the same Rayleigh-Ritz step;
# on the CPU, LAPACK's float64 SVD where that basis would be the whole short side).
EXACT_ROUTE_FRACTION = 0.25
# Largest sketch width the CUDA Jacobi kernel handles (one l x l matrix per block).
_CUDA_JACOBI_MAX = 512


class SVDResult(NamedTuple):
    """``A ~= U @ diag(S) @ V.mT``: U [..., m, k], S [..., k] descending, V [..., n, k]."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class IntruderDimensions(NamedTuple):
    """``count`` intruders among the top-k tuned directions, their ``indices`` (int64 [count])
    and, for every one of the k directions, ``max_cos`` = max_i |cos(y_j, x_i)| over the base
    directions x_i (float32 [k])."""

    count: int
    indices: torch.Tensor
    max_cos: torch.Tensor


def default_oversample_niter(rank: int, short: int, method: str = "accurate") -> tuple[int, int]:
    """The (oversample, n_iter) used when they are not given.

    ``accurate``: p = max(10, rank // 2) extra sketch columns (capped by the short side) and 3
    power passes: on the flattest spectra of the accuracy contract (Marchenko-Pastur bulk, rank
    ~10% of the short side) 2 passes leave the residual ~1% above optimal, 3 passes ~0.6%.
    With the in-kernel sketch this reads A 2 + n_iter = 5 times.
    ``torch_lowrank``: torch.svd_lowrank's defaults, p = 0 and n_iter = 2.
    """
    if method == "torch_lowrank":
        return 0, 2
    p = min(max(10, rank // 2), max(short - rank, 0))
    return p, 3


# ---------------------------------------------------------------------------------------------
# Orthonormalization: CholeskyQR(2) (float64, or fp32 for torch_lowrank on the CPU) with a
# Householder fallback
# ---------------------------------------------------------------------------------------------


def _cholqr_pass(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass on ``Y`` [b, r, c] in its own precision: (Q, R, ok[b])."""
    G = Y.mT @ Y
    L, info = torch.linalg.cholesky_ex(G)
    ok = info == 0
    if not bool(ok.all()):
        # Failed factorizations hold garbage; give them an identity so the solve stays finite.
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        L = torch.where(ok[:, None, None], L, eye)
    R = L.mT
    # Q = Y R^-1 through the explicit c x c inverse: a batched trsm with r right-hand-side rows
    # is ~100x slower on CPU than this GEMM; the second pass and the orthonormality check below
    # cover the (slightly) larger rounding of the explicit inverse.
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    Q = Y @ torch.linalg.solve_triangular(R, eye, upper=True)
    return Q, R, ok


def _orth(Y: torch.Tensor, *, passes: int = 2, want_r: bool = False, dtype: torch.dtype = torch.float64):
    """Orthonormal basis of the columns of ``Y`` [b, r, c] (r >= c), computed in ``dtype``.

    CholeskyQR repeated ``passes`` times (CholeskyQR2 by default: the second pass restores
    orthogonality to working precision for condition numbers up to ~1e8 in float64); matrices
    whose Gram is not positive definite, or whose result is not orthonormal (to 1e-10 in float64),
    are redone with Householder QR, which returns an orthonormal basis for any input
    (rank-deficient, zero). Returns Q (in ``dtype``), and R with Y = Q R when ``want_r``.

    ``dtype=torch.float32`` serves the torch_lowrank mode on the CPU for every input but float64
    (fp16/bf16 are computed in fp32 there), where
    torch.svd_lowrank's own Householder QR works in fp32 too and float64 products would cost a
    third of the call. An fp32 Gram squares the condition number past fp32's range sooner
    (cond(Y) > ~1e3), so there every basis is checked: one of CholeskyQR2 must be orthonormal to
    1e-5, one between power passes well conditioned (defect <= 0.5); the others fall back.
    """
    Y = Y.to(dtype)
    b, r, c = Y.shape
    Q, R, ok = _cholqr_pass(Y)
    for _ in range(passes - 1):
        Q, R2, ok2 = _cholqr_pass(Q)
        R, ok = R2 @ R, ok & ok2
    if b and (passes >= 2 or dtype != torch.float64):
        # Between power passes a well-conditioned basis is enough (in float64 a singular Gram
        # still falls back, and only that can go wrong); the final bases must be orthonormal to
        # working precision.
        tol = (1e-10 if dtype == torch.float64 else 1e-5) if passes >= 2 else 0.5
        eye = torch.eye(c, dtype=Y.dtype, device=Y.device)
        defect = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))
        ok = ok & (defect <= tol)  # a NaN defect compares False
    if b and not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(1)
        Qh, Rh = torch.linalg.qr(Y[bad])
        Q, R = Q.clone(), R.clone()
        Q[bad], R[bad] = Qh, Rh
    return (Q, R) if want_r else Q


# ---------------------------------------------------------------------------------------------
# Products with A: the only places the backends differ
# ---------------------------------------------------------------------------------------------


class _TorchOps:
    """Products with a [b, r, c] matrix ``M`` (possibly a transposed view) in its work dtype."""

    def __init__(self, M: torch.Tensor):
        self.M = M

    def mul(self, Q):  # M @ Q
        return self.M @ Q.to(self.M.dtype)

    def mul_t(self, Q):  # M^T @ Q
        return self.M.mT @ Q.to(self.M.dtype)

    def power(self, Q):  # M (M^T Q)
        return self.mul(self.mul_t(Q))


PASSES = ("auto", "fused", "atomic", "cublas")


def _passes_mode() -> str:
    """How the kernel backends run the sketch and power passes (FASTMODELS_RSVD_PASSES):
    "fused": the Triton sketch (Omega generated inside the GEMM) and the fused deterministic power
    pass; "atomic": the fused power pass with fp32 atomics (last bits vary run to run); "cublas":
    Omega materialized by the Triton Philox kernel, then cuBLAS batched GEMMs in A's dtype with fp32
    outputs, two per power pass; "auto" (default): the sketch as in "cublas" (the fused sketch
    regenerates Omega for every row block: 10.6 of a 117 ms call in the H200 profile), and the power
    pass fused only while its split-K partial sums move no more bytes than A
    (kernels.rsvd.partial_traffic_ratio(l) <= 1, l <= 32), else as two GEMMs."""
    mode = os.environ.get("FASTMODELS_RSVD_PASSES", "auto")
    if mode not in PASSES:
        raise ValueError(f"FASTMODELS_RSVD_PASSES: expected one of {PASSES}, got {mode!r}")
    return mode


def _bmm_f32(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X @ Y with fp32 output; X's dtype for the operands (fp32 accumulation in cuBLAS)."""
    Y = Y.to(X.dtype)
    if X.dtype == torch.float32:
        return torch.bmm(X, Y)
    try:
        return torch.bmm(X, Y, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # a torch or device (CPU) without bmm.dtype
        # the same products (exact in fp32) and fp32 sums, not a low-precision output rounded up
        return torch.bmm(X.to(torch.float32), Y.to(torch.float32))


def _bmm_hi_lo(X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """X @ Q in fp32 for an fp32 ``Q``. fp32 X: a plain fp32 GEMM. bf16/fp16 X: to ~2^-16 relative
    (bf16), Q = hi + lo + O(2^-16 |Q|) with hi and lo in X's dtype, and one low-precision GEMM over
    the columns [hi | lo] (fp32 accumulation), so X is read once at tensor-core speed instead of
    being upcast to fp32 for an fp32 GEMM (CUDA cores)."""
    if X.dtype == torch.float32:
        return X @ Q
    hi = Q.to(X.dtype)
    lo = (Q - hi.to(torch.float32)).to(X.dtype)
    l = Q.shape[-1]
    Z = _bmm_f32(X, torch.cat([hi, lo], dim=-1))
    return Z[..., :l] + Z[..., l:]


class _KernelOps:
    """Products with a contiguous [b, m, n] ``A`` through the Triton kernels (fp32 results)."""

    def __init__(self, A: torch.Tensor):
        from fastmodels.kernels import rsvd as kernels  # lazy: triton is optional

        self.kernels = kernels
        self.A = A
        self.mode = _passes_mode()
        if self.mode == "atomic":
            alert_not_deterministic("randomized_svd with FASTMODELS_RSVD_PASSES=atomic",
                                    "set FASTMODELS_RSVD_PASSES to auto (the default) or fused")

    def sketch(self, l: int, seed: int, transpose: bool = False):
        if self.mode in ("cublas", "auto"):
            b, m, n = self.A.shape
            omega = self.kernels.sketch_omega(b, m if transpose else n, l, seed, self.A.device)
            return _bmm_f32(self.A.mT if transpose else self.A, omega)
        return self.kernels.sketch_matmul(self.A, l, seed, transpose=transpose)

    def power(self, Q):
        mode = self.mode
        if mode == "auto":
            mode = "fused" if self.kernels.partial_traffic_ratio(Q.shape[-1]) <= 1 else "cublas"
        if mode == "cublas":  # A (A^T Q), W = A^T Q rounded to A's dtype as in the fused pass
            return _bmm_f32(self.A, _bmm_f32(self.A.mT, Q))
        return self.kernels.power_pass(self.A, Q.to(torch.float32).contiguous(), deterministic=mode == "fused")

    def mul_t(self, Q):  # A^T Q in fp32 (Rayleigh-Ritz)
        return _bmm_hi_lo(self.A.mT, Q.to(torch.float32))

    def mul(self, Q):  # A Q in fp32
        return _bmm_hi_lo(self.A, Q.to(torch.float32))


# ---------------------------------------------------------------------------------------------
# The algorithm on one bucket [b, m, n]
# ---------------------------------------------------------------------------------------------


def _complete_null_columns(X: torch.Tensor) -> torch.Tensor:
    """X [b, n, k] float64 with orthonormal or exactly-zero columns (the Jacobi kernel's long-side
    vectors of zero singular values are zero): zero columns replaced by an orthonormal completion
    (any basis of the complement is a valid choice), the others kept."""
    zero = X.abs().amax(dim=1) == 0  # [b, k]
    if not bool(zero.any()):
        return X
    X = X.clone()
    for i in zero.any(dim=1).nonzero()[:, 0].tolist():  # rank-deficient matrices only
        z = zero[i]
        kept = X[i][:, ~z]
        Q = torch.linalg.qr(kept, mode="complete").Q  # kept's span first, then its complement
        X[i][:, z] = Q[:, kept.shape[1] : kept.shape[1] + int(z.sum())]
    return X


SMALL_SVD_ROUTES = ("gesvda", "default")
# Acceptance bound of a fast small SVD, per matrix: max |U^T U - I|, max |V^T V - I| and
# ||R - U S V^T||_F / ||R||_F (float64; gesvda reached 6e-13, 8e-15 and 5e-15 at l = 768 on an H200).
_SMALL_SVD_TOL = 1e-9


def _small_svd_route() -> str:
    """How a CUDA float64 small SVD runs (FASTMODELS_RSVD_SMALL_SVD): "gesvda" (default):
    cuSOLVER's batched gesvda, each matrix's factors checked and the rare failures recomputed with
    the default driver; "default": torch.linalg.svd's default driver for all. On an H200
    (bench/gpu_profile.py small_svd, 28 matrices) gesvda took 0.91 ms at l = 96 and 61 ms at
    l = 768, the default driver 54 ms and 1273 ms (of a 77 ms rank-64 and a 1528 ms rank-512 call)."""
    mode = os.environ.get("FASTMODELS_RSVD_SMALL_SVD", "gesvda")
    if mode not in SMALL_SVD_ROUTES:
        raise ValueError(f"FASTMODELS_RSVD_SMALL_SVD: expected one of {SMALL_SVD_ROUTES}, got {mode!r}")
    return mode


def _svd_checked(R: torch.Tensor, fast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of R [b, l, l] from ``fast`` (an SVD that may be inaccurate: gesvda works from
    the Gram R^T R, so it loses the vectors of tiny singular values), with every matrix whose
    factors miss _SMALL_SVD_TOL (or are not finite) recomputed by torch.linalg.svd."""
    U, S, Vh = fast(R)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    err_u = (U.mT @ U - eye).abs().amax(dim=(-2, -1))
    err_v = (Vh @ Vh.mT - eye).abs().amax(dim=(-2, -1))
    norm = torch.linalg.matrix_norm(R)
    rec = torch.linalg.matrix_norm(R - (U * S[..., None, :]) @ Vh) / torch.where(norm > 0, norm, 1.0)
    ok = (err_u <= _SMALL_SVD_TOL) & (err_v <= _SMALL_SVD_TOL) & (rec <= _SMALL_SVD_TOL) & S.isfinite().all(dim=-1)
    if bool(ok.all()):  # NaN fails every comparison above
        return U, S, Vh
    bad = (~ok).nonzero()[:, 0]
    U, S, Vh = U.clone(), S.clone(), Vh.clone()
    U[bad], S[bad], Vh[bad] = torch.linalg.svd(R[bad])
    return U, S, Vh


def _small_svd(R: torch.Tensor, small: str):
    """SVD of the small square factor: R = Ur diag(S) Vr^T (float64 results, orthonormal factors)."""
    if small == "cuda":
        from fastmodels.ops import _jacobi

        Ur, S, Vr = _jacobi.jacobi_svd(R.to(torch.float32).contiguous(), backend="cuda")
        return _complete_null_columns(Ur.to(torch.float64)), S.to(torch.float64), _complete_null_columns(Vr.to(torch.float64))
    if R.is_cuda and _small_svd_route() == "gesvda":
        Ur, S, Vrh = _svd_checked(R, lambda X: torch.linalg.svd(X, driver="gesvda"))
    else:
        Ur, S, Vrh = torch.linalg.svd(R)
    return Ur, S, Vrh.mT


def _rayleigh_ritz(ops, Q: torch.Tensor, k: int, side: str, small: str, dtype: torch.dtype = torch.float64):
    """Given an orthonormal basis Q of M's column space (side="rows", Q [b, r, l]) or row space
    (side="cols", Q [b, c, l]), the best rank-k factorization of M within it: (U, S, V) in
    ``dtype`` (the small SVD is float64 either way)."""
    C = ops.mul_t(Q) if side == "rows" else ops.mul(Q)  # B^T = M^T Q, or M Q
    Qc, R = _orth(C, want_r=True, dtype=dtype)  # C = Qc R
    Ur, S, Vr = (x.to(dtype) for x in _small_svd(R.to(torch.float64), small))  # R = Ur S Vr^T
    Q = Q.to(dtype)
    if side == "rows":  # M ~ Q Q^T M = Q C^T = (Q Vr) S (Qc Ur)^T
        U, V = Q @ Vr[..., :k], Qc @ Ur[..., :k]
    else:  # M ~ M Q Q^T = C Q^T = (Qc Ur) S (Q Vr)^T
        U, V = Qc @ Ur[..., :k], Q @ Vr[..., :k]
    return U, S[..., :k], V


def _sketch_reference(b: int, rows: int, cols: int, seed: int, dtype, device) -> torch.Tensor:
    """Omega [b, rows, cols] ~ N(0, 1); matrix i depends only on (seed, i, rows, cols)."""
    out = torch.empty(b, rows, cols, dtype=dtype, device=device)
    g = torch.Generator(device=device)
    for i in range(b):
        g.manual_seed((seed * 1_000_003 + i) % (1 << 63))
        out[i] = torch.randn(rows, cols, generator=g, dtype=dtype, device=device)
    return out


def _exact_basis(ops_short, s: int, l: int) -> torch.Tensor:
    """Top-l eigenvectors of the float64 Gram M M^T (float64 eigh): the exact route's basis.
    An fp32 Gram would blur every direction with sigma^2 < 1e-7 sigma_1^2."""
    M = ops_short.M.to(torch.float64)
    G = M @ M.mT
    _, evecs = torch.linalg.eigh(G)  # ascending
    return evecs[..., s - l :].flip(-1)


def _rsvd_bucket(A: torch.Tensor, k: int, p: int, q: int, method: str, seed: int, backend: str, amax: torch.Tensor):
    """(U, S, V, e) for a bucket A [b, m, n]: float64 (float32 from the torch_lowrank mode's fp32
    CPU path); S is that of A scaled by 2**-e where e is not None (see :func:`_rescale`, applied to
    the tensor each route computes on, in its work dtype; ``amax`` is max |A| of each matrix)."""
    exps = []

    def fit(X: torch.Tensor) -> torch.Tensor:
        X, e = _rescale(X, amax)
        exps.append(e)
        return X

    U, S, V = _rsvd_route(A, k, p, q, method, seed, backend, fit)
    return U, S, V, (exps[0] if exps else None)


def _rsvd_route(A: torch.Tensor, k: int, p: int, q: int, method: str, seed: int, backend: str, fit):
    b, m, n = A.shape
    s = min(m, n)
    use_kernels = backend in ("triton", "cuda") and A.dtype != torch.float64
    if use_kernels:  # shapes beyond the kernels' launch grids take the torch matmuls
        from fastmodels.kernels.rsvd import grid_ok

        use_kernels = grid_ok(b, m, n)
    # the CUDA Jacobi kernel is fp32: float64 input keeps the float64 linalg.svd
    small = "cuda" if backend == "cuda" and k + p <= _CUDA_JACOBI_MAX and A.dtype != torch.float64 else "reference"
    if method == "accurate":
        l = min(k + p, s)
        if k > EXACT_ROUTE_FRACTION * s or l >= s:
            if l >= s and A.device.type == "cpu":
                # The basis would be the whole short side, and Gram + eigh + Rayleigh-Ritz would
                # cost three decompositions: LAPACK's float64 SVD is the exact answer for less
                # (1.7-1.9x faster, one thread, tall and wide shapes from 256 x 4096 to
                # 1536 x 576), run on the tall orientation (LAPACK is 2.7-4x slower on a wide
                # matrix than on its transpose). No rescale: float64, and no squares are formed.
                X = A.to(torch.float64)
                U, S, Vh = torch.linalg.svd(X if m >= n else X.mT, full_matrices=False)
                U, S, V = U[..., :k], S[..., :k], Vh.mT[..., :k]
                return (U, S, V) if m >= n else (V, S, U)
            work = fit(A if A.dtype in (torch.float32, torch.float64) else A.to(torch.float32))
            X = work if m <= n else work.mT  # short side as rows
            ops = _TorchOps(X)
            Q = _exact_basis(ops, s, l)
            U, S, V = _rayleigh_ritz(ops, Q, k, "rows", small)
            return (U, S, V) if m <= n else (V, S, U)
        if use_kernels:
            ops = _KernelOps(fit(A.contiguous()))
            Y = ops.sketch(l, seed)  # A Omega [b, m, l]
            for _ in range(q):
                Y = ops.power(_orth(Y, passes=1))
            return _rayleigh_ritz(ops, _orth(Y), k, "rows", small)
        work = fit(A if A.dtype in (torch.float32, torch.float64) else A.to(torch.float32))
        X = work if m <= n else work.mT
        ops = _TorchOps(X)
        r, c = X.shape[-2:]
        Y = ops.mul(_sketch_reference(b, c, l, seed, work.dtype, A.device))
        for _ in range(q):
            Y = ops.power(_orth(Y, passes=1))
        U, S, V = _rayleigh_ritz(ops, _orth(Y), k, "rows", small)
        return (U, S, V) if m <= n else (V, S, U)

    # method == "torch_lowrank": torch.svd_lowrank(A, q=k+p, niter=q) with CholeskyQR2 for QR.
    l = min(k + p, s)
    if use_kernels:
        ops = _KernelOps(fit(A.contiguous()))
        if m >= n:  # torch's tall case: Y = A R, (A A^T) passes, Rayleigh-Ritz on the columns
            Y = ops.sketch(l, seed)
            for _ in range(q):
                Y = ops.power(_orth(Y, passes=1))
            return _rayleigh_ritz(ops, _orth(Y), k, "rows", small)
        # Wide: torch works on A^T; its final basis is orth(A^T (A A^T)^q R), R [m, l].
        Y = ops.kernels.sketch_omega(b, m, l, seed, A.device)
        for _ in range(q):
            Y = ops.power(_orth(Y, passes=1))
        Qn = _orth(ops.mul_t(_orth(Y)))
        return _rayleigh_ritz(ops, Qn, k, "cols", small)
    work = fit(A if A.dtype in (torch.float32, torch.float64) else A.to(torch.float32))
    M = work if m >= n else work.mT  # tall, as torch does
    ops = _TorchOps(M)
    # torch's QR works in the input's precision (fp32 for fp16/bf16, upcast above): so does this
    # path, on the CPU (float64 products there cost a third of the call).
    wd = work.dtype if A.device.type == "cpu" else torch.float64
    omega = _sketch_reference(b, s, l, seed, work.dtype, A.device)
    if wd != torch.float64 and 2 * l > s:
        # A basis of more than half the short side: torch's own steps, Householder QR (LAPACK) and
        # an fp32 SVD of B^T = M^T Q, cost less here than CholeskyQR with its checks and the
        # float64 orthonormalization and SVD of the Rayleigh-Ritz step (12 matrices 1536 x 576,
        # l = 518, 2-core dev CPU: 2.2 s against 3.9-5.5 s, torch.svd_lowrank looped 2.05 s; below
        # l = s / 2 CholeskyQR keeps 0.8-1.5x torch's speed at l = 28-115, 1.36x at rank 64 of 1024).
        Q = torch.linalg.qr(ops.mul(omega)).Q
        for _ in range(q):
            Q = torch.linalg.qr(ops.mul_t(Q)).Q
            Q = torch.linalg.qr(ops.mul(Q)).Q
        Uc, S, Vch = torch.linalg.svd(ops.mul_t(Q), full_matrices=False)  # M ~ Q Q^T M = Q Vc S Uc^T
        U, S, V = Q @ Vch.mT[..., :k], S[..., :k], Uc[..., :k]
        return (U, S, V) if m >= n else (V, S, U)
    # Between steps a well-conditioned basis spans the same space as torch's Householder Q; only
    # the last one, which the Rayleigh-Ritz step projects on, must be orthonormal.
    Q = _orth(ops.mul(omega), passes=1, dtype=wd)
    for _ in range(q):
        Q = _orth(ops.mul_t(Q), passes=1, dtype=wd)
        Q = _orth(ops.mul(Q), passes=1, dtype=wd)
    U, S, V = _rayleigh_ritz(ops, _orth(Q, dtype=wd), k, "rows", small, dtype=wd)
    return (U, S, V) if m >= n else (V, S, U)


def _normalize_signs(U: torch.Tensor, V: torch.Tensor):
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive."""
    if U.shape[-2] == 0 or U.shape[-1] == 0:
        return U, V
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def _finish(U, S, V, dtype):
    out = torch.float64 if dtype == torch.float64 else torch.float32
    U, V = _normalize_signs(U, V)
    return U.to(out), S.clamp_min(0).to(out), V.to(out)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_matrix(A, name: str) -> torch.Tensor:
    check_tensor(A, name, dtypes=FLOAT_DTYPES)
    if A.dim() < 2:
        raise ValueError(f"{name}: expected a matrix or a batch of matrices [..., m, n], got shape {list(A.shape)}")
    return A


def _check_finite_batch(A3: torch.Tensor, name: str) -> torch.Tensor:
    """NaN/inf input would fail deep inside linalg with a misleading message: say so up front.
    Returns max |A| of each matrix ([b], A's dtype) for :func:`_rescale`. amax and amin of each
    matrix (NaN propagates through both, +inf shows in amax, -inf in amin) cost less than an fp32
    sum for bf16/fp16 on the CPU, and no finite input gives a false alarm."""
    hi, lo = A3.amax(dim=(1, 2)), A3.amin(dim=(1, 2))
    bad = ~(torch.isfinite(hi) & torch.isfinite(lo))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        where = f" (matrix {i} of the batch)" if A3.shape[0] > 1 else ""
        raise ValueError(f"{name}: expected finite values, found NaN or inf{where}")
    return torch.maximum(hi, -lo)


# Power passes form sigma_1^2-sized values (A (A^T Q)) in the work precision, and the kernel
# backends round W = A^T Q (entries up to a column norm of A) to A's dtype: matrices whose max |A|
# puts these outside the work dtype's range (fp32 overflow from sigma_1 ~ 2e19, underflow of
# sigma_1^2 below ~1e-23; fp16's W past 65504 on the kernel backends) are factored scaled by a power
# of two (exact), and S unscaled. Each route scales the tensor it computes on (fp32 for fp16 input
# on the torch routes; none for the CPU's float64 LAPACK route), so no route loses entries to a
# dtype's subnormals that its own work precision would have kept.
def _safe_amax(dtype: torch.dtype, m: int, n: int) -> tuple[float, float]:
    """(low, high): max |A| of a matrix that needs no rescaling lies in [low, high)."""
    if dtype == torch.float64:
        return 2.0**-400, 2.0**400 / math.sqrt(m * n)
    if dtype == torch.float16:  # W = A^T Q in fp16: entries <= a column norm <= amax sqrt(m) (or sqrt(n))
        return 0.0, 2.0**14 / math.sqrt(max(m, n))
    return 2.0**-40, 2.0**40 / math.sqrt(m * n)  # fp32 work: sigma_1^2 * width within 2^+-126


def _ldexp2(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x * 2**e (e an integer tensor broadcast against x) in two steps by factors of x's dtype, each
    exact (powers of two), so that 2**e itself need not be representable in that dtype."""
    h = torch.div(e, 2, rounding_mode="floor")
    two = torch.tensor(2.0, dtype=torch.float64, device=x.device)
    return x * two.pow(h).to(x.dtype) * two.pow(e - h).to(x.dtype)


def _rescale(A3: torch.Tensor, amax: torch.Tensor):
    """(A3 with every matrix out of its dtype's safe range scaled by a power of two, exponents [b])
    or (A3, None) when no matrix needs it (the usual case: one comparison on [b]). ``amax``: max |A|
    of each matrix. Scaled, max |A| lies in [0.5, 1), or for fp16 (whose only limit is overflow,
    and whose subnormals start 2^-24 below 1) just under the safe bound. The scaled copy keeps A3's
    dtype; in-range matrices get a factor 1."""
    low, high = _safe_amax(A3.dtype, *A3.shape[-2:])
    a = amax.to(torch.float64)
    flag = ((a >= high) | (a < low)) & (a > 0)  # all-zero matrices need nothing
    if not bool(flag.any()):
        return A3, None
    top = math.floor(math.log2(high)) if A3.dtype == torch.float16 else 0  # scaled max |A| < 2**top
    e = torch.where(flag, torch.frexp(a).exponent - top, 0).to(torch.int64)
    return _ldexp2(A3, -e[:, None, None]), e


def _unscale(S: torch.Tensor, e: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """S of the scaled matrices back to A's scale (float64); an error where it leaves the range of
    the result's dtype (float32 for fp32/bf16/fp16 input)."""
    S = _ldexp2(S.to(torch.float64), e[:, None])
    out = torch.float64 if dtype == torch.float64 else torch.float32
    big = ~(S.amax(dim=-1) <= torch.finfo(out).max)
    if bool(big.any()):
        i = int(big.nonzero()[0, 0])
        where = f" (matrix {i} of the batch)" if S.shape[0] > 1 else ""
        raise ValueError(f"{name}: its largest singular value{where} exceeds the range of the {str(out).replace('torch.', '')} "
                         f"result ({torch.finfo(out).max:.3g}); scale A down")
    return S


def _resolve_seed(seed) -> int:
    if seed is None:
        return int(torch.randint(0, 1 << 62, (1,)).item())
    return check_int(seed, "seed", low=0, high=(1 << 63) - 1)


def _resolve_settings(k: int, s: int, method: str, oversample, n_iter) -> tuple[int, int]:
    p_def, q_def = default_oversample_niter(k, s, method)
    p = p_def if oversample is None else check_int(oversample, "oversample", low=0)
    q = q_def if n_iter is None else check_int(n_iter, "n_iter", low=0)
    return p, q


@autocast_off
def randomized_svd(A, rank: int, *, oversample: int | None = None, n_iter: int | None = None, method: str = "accurate", seed: int | None = None, backend: str | None = None):
    """Truncated SVD ``A ~= U @ diag(S) @ V.mT`` of rank ``rank`` by randomized subspace iteration.

    Args:
        A: a tensor [..., m, n] (float64/32/16, bfloat16), or a list of 2-D tensors of any shapes
            on one device (bucketed by shape, dtype and rank internally; a list of results is
            returned).
        rank: k, 1 <= k <= min(m, n); for a list, one int for every matrix or a list of one int
            per matrix (e.g. a fraction of each matrix's max rank, as LASER's rho).
        oversample: extra sketch columns p (default: see :func:`default_oversample_niter`).
        n_iter: power iterations q, each a pass ``A (A^T Y)`` (default: as above).
        method: ``"accurate"`` -- ``||A - U S V^T||_F`` within 1% of the optimal ``||A - A_k||_F``
            on LLM-like spectra, ``||U^T U - I||_max <= 1e-5``; ranks above 25% of min(m, n) take
            an exact route (Gram + float64 eigh, or on the CPU a float64 SVD where rank plus
            oversampling covers min(m, n)). ``"torch_lowrank"`` -- what
            ``torch.svd_lowrank(A, q=rank, niter=n_iter or 2)`` computes (LASER's edit), no
            oversampling unless ``oversample`` is given, batched.
        seed: the sketch's seed (default: drawn from torch's global generator). Matrix i of a batch
            (or of a bucket of a list: same shape, dtype and rank) gets its own sketch from
            (seed, i), so the same seed gives the same result.
        backend: "reference", "triton" or "cuda" (default: triton on CUDA, reference on CPU).

    Returns:
        ``SVDResult(U [..., m, k], S [..., k] descending, V [..., n, k])``; float64 for float64
        input, float32 otherwise. Each u_i has its largest-magnitude entry positive.
    """
    check_choice(method, "method", METHODS)
    for value, name in ((oversample, "oversample"), (n_iter, "n_iter")):
        if value is not None:
            check_int(value, name, low=0)
    if isinstance(A, (list, tuple)):
        return _randomized_svd_list(list(A), rank, oversample=oversample, n_iter=n_iter, method=method, seed=seed, backend=backend)
    _check_matrix(A, "A")
    m, n = A.shape[-2:]
    s = min(m, n)
    k = check_int(rank, "rank", low=1)
    if k > s:
        raise ValueError(f"rank: expected an int <= min(m, n) = {s} for A of shape {list(A.shape)}, got {k}")
    p, q = _resolve_settings(k, s, method, oversample, n_iter)
    seed = _resolve_seed(seed)
    chosen = _resolve_backend(backend, A.device)
    batch = A.shape[:-2]
    A3 = A.reshape(-1, m, n)
    if A3.shape[0] == 0:
        out = torch.float64 if A.dtype == torch.float64 else torch.float32
        z = lambda *sh: torch.zeros(*batch, *sh, dtype=out, device=A.device)  # noqa: E731
        return SVDResult(z(m, k), z(k), z(n, k))
    U, S, V = _rsvd_op(A3.detach(), k, p, q, method, seed, chosen)
    return SVDResult(U.reshape(*batch, m, k), S.reshape(*batch, k), V.reshape(*batch, n, k))


@constant_under_compile
def _resolve_backend(backend: str | None, device: torch.device) -> str:
    # Evaluated once at trace time under torch.compile (the dispatcher reads the environment and
    # imports modules, which dynamo does not trace).
    return select_backend("randomized_svd", backend, device)


@torch.library.custom_op("fastmodels::randomized_svd", mutates_args=())
def _rsvd_op(A3: torch.Tensor, k: int, p: int, q: int, method: str, seed: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factorization of a [b, m, n] batch as one opaque op (torch.compile traces around it).
    No autograd: a randomized factorization (weights that require grad may be passed)."""
    amax = _check_finite_batch(A3, "A")  # here, so that it also runs in a compiled graph
    with torch.no_grad():
        U, S, V, e = _rsvd_bucket(A3, k, p, q, method, seed, backend, amax)
        if e is not None:
            S = _unscale(S, e, A3.dtype, "A")
        U, S, V = _finish(U, S, V, A3.dtype)
    return U.contiguous(), S.contiguous(), V.contiguous()


@_rsvd_op.register_fake
def _rsvd_fake(A3, k, p, q, method, seed, backend):
    b, m, n = A3.shape
    out = torch.float64 if A3.dtype == torch.float64 else torch.float32
    return A3.new_empty((b, m, k), dtype=out), A3.new_empty((b, k), dtype=out), A3.new_empty((b, n, k), dtype=out)


def _randomized_svd_list(mats: list, rank, **kw) -> list:
    if not mats:  # nothing to factor, but the arguments are still checked
        if not (isinstance(rank, (list, tuple)) and not rank):
            check_int(rank, "rank", low=1)
        if kw["seed"] is not None:
            _resolve_seed(kw["seed"])
        if kw["backend"] is not None:
            check_choice(kw["backend"], "backend", _OP_INFO.backends)
        return []
    if isinstance(rank, (list, tuple)):  # one rank per matrix
        if len(rank) != len(mats):
            raise ValueError(f"rank: expected an int or one int per matrix ({len(mats)}), got {len(rank)} ranks")
        ranks, name = list(rank), "rank[{}]"
    else:
        ranks, name = [rank] * len(mats), "rank"
    device = None
    for i, M in enumerate(mats):
        check_tensor(M, f"A[{i}]", ndim=2, dtypes=FLOAT_DTYPES)
        if device is None:
            device = M.device
        elif M.device != device:
            raise ValueError(f"A[{i}]: expected a tensor on {device} (the device of A[0]), got one on {M.device}")
        check_finite(M, f"A[{i}]")
        k = ranks[i] = check_int(ranks[i], name.format(i), low=1)
        if k > min(M.shape):
            raise ValueError(f"{name.format(i)}: expected an int <= min(m, n) = {min(M.shape)} for A[{i}] of shape {list(M.shape)}, got {k}")
    seed = _resolve_seed(kw.pop("seed"))
    buckets: dict[tuple, list[int]] = {}
    for i, M in enumerate(mats):
        buckets.setdefault((tuple(M.shape), M.dtype, ranks[i]), []).append(i)
    results: list = [None] * len(mats)
    for (_, _, k), idx in buckets.items():
        res = randomized_svd(torch.stack([mats[i] for i in idx]), k, seed=seed, **kw)
        for j, i in enumerate(idx):
            results[i] = SVDResult(res.U[j], res.S[j], res.V[j])
    return results


def _check_factorization(svd, A: torch.Tensor, kmax: int) -> None:
    """svd= of low_rank: (U [..., m, r], S [..., r], V [..., n, r]) of A's batch and shape, r >= kmax."""
    if not isinstance(svd, (tuple, list)) or len(svd) != 3 or not all(isinstance(t, torch.Tensor) for t in svd):
        raise TypeError(f"svd: expected an SVDResult or a tuple (U, S, V) of tensors, got {type(svd).__name__}")
    U, S, V = svd
    *batch, m, n = A.shape
    names = [f"b{i}" for i in range(len(batch))]
    dims = dict(zip(names, batch), m=m, n=n)
    check_tensor(U, "svd.U", shape=(*names, "m", "r"), dims=dims, dtypes=FLOAT_DTYPES, device=A.device, device_of="A")
    check_tensor(S, "svd.S", shape=(*names, "r"), dims=dims, dtypes=FLOAT_DTYPES, device=A.device, device_of="A")
    check_tensor(V, "svd.V", shape=(*names, "n", "r"), dims=dims, dtypes=FLOAT_DTYPES, device=A.device, device_of="A")
    if dims["r"] < kmax:
        raise ValueError(f"svd: has {dims['r']} singular triplets, fewer than max(ranks) = {kmax}")


@autocast_off
def low_rank(A, ranks, *, oversample: int | None = None, n_iter: int | None = None, method: str = "accurate", seed: int | None = None, backend: str | None = None, svd: SVDResult | None = None):
    """Rank-k approximation ``U_k diag(S_k) V_k^T`` of A [..., m, n] in A's dtype.

    ``ranks`` is an int (returns a tensor) or a sequence of ints (returns a list, one per rank,
    all sliced from ONE factorization at the largest rank). Pass ``svd`` (a result of
    :func:`randomized_svd` with at least max(ranks) columns) to reuse a factorization.
    Other arguments as in :func:`randomized_svd`.
    """
    _check_matrix(A, "A")
    single = not isinstance(ranks, (list, tuple))
    rank_list = [ranks] if single else list(ranks)
    if not rank_list:
        raise ValueError("ranks: expected an int or a non-empty sequence of ints")
    s = min(A.shape[-2:])
    for r in rank_list:
        check_int(r, "ranks", low=1, high=s)
    kmax = max(rank_list)
    if svd is None:
        svd = randomized_svd(A, kmax, oversample=oversample, n_iter=n_iter, method=method, seed=seed, backend=backend)
    else:
        _check_factorization(svd, A, kmax)
    U, S, V = svd
    # one working dtype for factors of mixed dtypes (svd=), at least float32
    dt = torch.float64 if torch.float64 in (U.dtype, S.dtype, V.dtype) else torch.float32
    U, S, V = U.to(dt), S.to(dt), V.to(dt)
    with torch.no_grad():
        outs = [((U[..., :r] * S[..., None, :r]) @ V[..., :r].mT).to(A.dtype) for r in rank_list]
    return outs[0] if single else outs


@autocast_off
def singular_value_grads(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``dL/dsigma_i = u_i^T G v_i`` for ``W = U diag(S) V^T`` and ``G = dL/dW``: [..., k] float32
    (float64 for float64 factors). Computed as ``sum_rows(U * (G V))`` (one [m, n] x [n, k]
    product), never forming the k x k matrix ``U^T G V``. ``S`` fixes k and is otherwise unused.
    """
    dims: dict = {}
    check_tensor(U, "U", dtypes=FLOAT_DTYPES)
    if U.dim() < 2:
        raise ValueError(f"U: expected [..., m, k], got shape {list(U.shape)}")
    batch = list(U.shape[:-2])
    names = [f"b{i}" for i in range(len(batch))]
    check_tensor(U, "U", shape=(*names, "m", "k"), dims=dims)
    check_tensor(S, "S", shape=(*names, "k"), dims=dims, dtypes=FLOAT_DTYPES, device=U.device, device_of="U")
    check_tensor(V, "V", shape=(*names, "n", "k"), dims=dims, dtypes=FLOAT_DTYPES, device=U.device, device_of="U")
    check_tensor(G, "G", shape=(*names, "m", "n"), dims=dims, dtypes=FLOAT_DTYPES, device=U.device, device_of="U")
    dt = torch.float64 if U.dtype == torch.float64 else torch.float32
    GV = G.to(dt) @ V.to(dt)  # [..., m, k]
    return (U.to(dt) * GV).sum(dim=-2)


# ---------------------------------------------------------------------------------------------
# Intruder dimensions
# ---------------------------------------------------------------------------------------------


def _top_left_exact(W: torch.Tensor, k: int, lora=None) -> torch.Tensor:
    """Top-k left singular vectors [m, k] (float64) of ``W`` or, with ``lora = (B, A, scale)``, of
    ``W + scale B A`` without forming that sum: float64 eigh of the Gram matrix on the short side,
    assembled from W, B and A. Exact, like the SVD the paper takes: a randomized SVD pins down the
    top-k subspace but not its individual vectors when singular values are close (flat LLM-like
    spectra), and max |cos| is taken per vector."""
    Wd = W.to(torch.float64)
    m, n = Wd.shape
    if lora is not None:
        Bd, Ad, scale = lora[0].to(torch.float64), lora[1].to(torch.float64), float(lora[2])
    if m <= n:  # G = W_t W_t^T = W W^T + s (B (A W^T) + (W A^T) B^T) + s^2 B (A A^T) B^T
        G = Wd @ Wd.mT
        if lora is not None:
            P = Bd @ (Ad @ Wd.mT)  # [m, m]
            G = G + scale * (P + P.mT) + scale**2 * (Bd @ (Ad @ Ad.mT) @ Bd.mT)
        return torch.linalg.eigh(G)[1][:, m - k :].flip(-1)
    # tall: right vectors from the n x n Gram, then u_i = W_t v_i / |W_t v_i|
    G = Wd.mT @ Wd
    if lora is not None:
        P = (Wd.mT @ Bd) @ Ad  # [n, n]
        G = G + scale * (P + P.mT) + scale**2 * (Ad.mT @ (Bd.mT @ Bd) @ Ad)
    Vk = torch.linalg.eigh(G)[1][:, n - k :].flip(-1)
    Uk = Wd @ Vk if lora is None else Wd @ Vk + scale * (Bd @ (Ad @ Vk))
    return _orth(Uk[None])[0]  # normalizes; orthonormal even where sigma_i = 0


def _left_vectors(base_svd, m: int, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(base_svd, (tuple, list)) and not base_svd:
        raise ValueError("base_svd: expected a tensor [m, s] or a tuple whose first element is one, got an empty sequence")
    Xb = base_svd[0] if isinstance(base_svd, (tuple, list)) else base_svd
    check_tensor(Xb, "base_svd", shape=(m, None), dtypes=FLOAT_DTYPES, device=device, device_of="W_base")
    check_finite(Xb, "base_svd")
    if Xb.shape[1] < min(m, n):
        raise ValueError(
            f"base_svd: expected all min(m, n) = {min(m, n)} left singular vectors of W_base (e.g. "
            f"torch.linalg.svd(W_base, full_matrices=False)), got {Xb.shape[1]}: against a truncated "
            f"basis every direction outside it would count as an intruder")
    # Columns past min(m, n) (full_matrices=True of a tall W_base) span the null space of W_base^T:
    # not directions of W_base, and counting them would hide intruders that point there.
    return Xb[:, : min(m, n)]


@autocast_off
def intruder_dimensions(W_base: torch.Tensor, W_tuned, k: int = 10, eps: float = 0.5, base_svd=None) -> IntruderDimensions:
    """Intruder dimensions of a fine-tuned matrix (Shuttleworth et al., arXiv:2410.21228).

    Among the top-``k`` left singular vectors y_j of ``W_tuned``, the intruders are those with
    max_i |cos(y_j, x_i)| < ``eps`` over all left singular vectors x_i of ``W_base``.

    Args:
        W_base: the pre-trained matrix [m, n].
        W_tuned: the fine-tuned matrix [m, n], or a LoRA adapter ``(W_base, B, A, scale)``
            meaning ``W_base + scale * B @ A`` (B [m, r], A [r, n]); the sum is never formed.
            Its top-k left singular vectors are exact (float64 eigh of its Gram matrix on the
            short side, assembled from W_base, B and A for a LoRA adapter).
        k, eps: the paper's defaults, 10 and 0.5.
        base_svd: optionally all left singular vectors of W_base (a tensor [m, s], s >= min(m, n),
            or a tuple whose first element is it, e.g. ``torch.linalg.svd(W_base,
            full_matrices=False)``; only its first min(m, n) columns are used); computed with
            ``torch.linalg.svd`` otherwise.

    Returns:
        ``IntruderDimensions(count, indices, max_cos)`` (max_cos [k] float32).
    """
    check_tensor(W_base, "W_base", ndim=2, dtypes=FLOAT_DTYPES)
    m, n = W_base.shape
    k = check_int(k, "k", low=1, high=min(m, n))
    eps = check_float(eps, "eps", low=0.0, high=1.0)
    check_finite(W_base, "W_base")
    dt = torch.float64 if W_base.dtype == torch.float64 else torch.float32
    if isinstance(W_tuned, (tuple, list)):
        if len(W_tuned) != 4:
            raise ValueError(f"W_tuned: expected a tensor or a LoRA tuple (W_base, B, A, scale), got a sequence of length {len(W_tuned)}")
        W0, Bm, Am, scale = W_tuned
        dims = {"m": m, "n": n}
        for x, name, shape in ((W0, "W_tuned[0]", ("m", "n")), (Bm, "W_tuned[1] (B)", ("m", "r")), (Am, "W_tuned[2] (A)", ("r", "n"))):
            check_tensor(x, name, shape=shape, dims=dims, dtypes=FLOAT_DTYPES, device=W_base.device, device_of="W_base")
            check_finite(x, name)
        scale = check_float(scale, "W_tuned[3] (scale)")
        Y = _top_left_exact(W0, k, (Bm, Am, scale))
    else:
        check_tensor(W_tuned, "W_tuned", shape=(m, n), dtypes=FLOAT_DTYPES, device=W_base.device, device_of="W_base")
        check_finite(W_tuned, "W_tuned")
        Y = _top_left_exact(W_tuned, k)
    if base_svd is None:
        Xb = torch.linalg.svd(W_base.to(dt), full_matrices=False).U
    else:
        Xb = _left_vectors(base_svd, m, n, W_base.device)
    cos = (Xb.to(torch.float64).mT @ Y).abs()  # [s, k]; unit vectors
    max_cos = cos.amax(dim=0).to(torch.float32)
    indices = (max_cos < eps).nonzero().squeeze(1)
    return IntruderDimensions(int(indices.numel()), indices, max_cos)


def rsvd_reference(A: torch.Tensor, rank: int, **kw) -> SVDResult:
    """The reference backend of :func:`randomized_svd` (same arguments)."""
    return randomized_svd(A, rank, backend="reference", **kw)
