"""Batched one-sided Jacobi (Hestenes) SVD for the small factor of the randomized SVD.

``jacobi_svd(B, backend)`` factors B [b, r, c] (fp32, r, c <= 512) as U diag(S) V^T with
k = min(r, c), S descending.

Algorithm (identical in both backends; ``csrc/cuda/jacobi_svd.cu`` mirrors ``_jacobi_reference``
step by step):

1. Work on the long side. With L = max(r, c) and k = min(r, c), the working matrix G holds k
   columns of length L: the columns of B if r >= c, else the columns of B^T (the rows of B). It is
   stored column-major, ``G[j]`` = column j. The rotation accumulator Vacc [k, k] starts at I.
2. Sweeps of a round-robin (circle-method) tournament over the k columns (k rounded up to an even
   n2 with a dummy column when odd): round t = 0..n2-2 pairs position i with position n2-1-i of
   ``[0] + roll([1..n2-1], -t)``; pairs of one round are disjoint and independent.
   For each pair (p, q) with p < q: alpha = |g_p|^2, beta = |g_q|^2, gamma = g_p . g_q; if
   |gamma| > tol * sqrt(alpha * beta), rotate (Rutishauser's formulas):
       zeta = (beta - alpha) / (2 gamma),  t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)) (sign(0) = +1),
       c = 1 / sqrt(1 + t^2),  s = c t,
       g_p <- c g_p - s g_q,  g_q <- s g_p + c g_q   (same for the columns of Vacc).
   A sweep in which no pair rotates ends the iteration (at most ``max_sweeps`` sweeps). In a batch,
   a matrix that converged does not rotate again, so batching equals running matrices one by one.
   Input and outputs are fp32, but G, Vacc and the rotations are kept in fp64 (free on Hopper,
   where fp64 FMA throughput equals fp32's non-tensor throughput): with fp32 working storage the
   thousands of accumulated rotations leave ||Vacc^T Vacc - I||_max ~ 2.5e-5 at k = 128 (measured),
   too much for the rSVD's 1e-5 orthonormality contract; in fp64 the outputs are orthonormal to fp32
   rounding. The default tol = 1e-8 is below fp32 resolution, and quadratic convergence makes the
   last sweep cheap.
3. S_j = |g_j|; the normalized columns g_j / S_j are the singular vectors of the long side, Vacc
   those of the short side (always orthonormal). A column with S_j == 0 exactly (B rank-deficient in
   exact arithmetic, e.g. all zero) gets a zero singular vector on the long side.
4. Sort descending (stable: rank_j = #{i : S_i > S_j or (S_i == S_j and i < j)}) and normalize
   signs: the largest-|.| entry of each column of U (first one on ties) is made positive, flipping
   the same column of V.
"""

from __future__ import annotations

import ctypes

import torch

from fastmodels._validation import check_finite

MAX_DIM = 512
DEFAULT_MAX_SWEEPS = 15
DEFAULT_TOL = 1e-8


def round_robin_pairs(k: int) -> list[tuple[list[int], list[int]]]:
    """For each round of one sweep: (p indices, q indices), p < q, disjoint, dummy column dropped."""
    n2 = k + (k % 2)
    rounds = []
    for t in range(n2 - 1):
        # position 0 is fixed; positions 1..n2-1 hold column 1 + ((pos - 1 + t) mod (n2 - 1))
        arr = [0] + [1 + ((pos - 1 + t) % (n2 - 1)) for pos in range(1, n2)]
        ps, qs = [], []
        for i in range(n2 // 2):
            a, b = arr[i], arr[n2 - 1 - i]
            p, q = min(a, b), max(a, b)
            if q < k:  # the dummy column (index k when k is odd) pairs with nothing
                ps.append(p)
                qs.append(q)
        rounds.append((ps, qs))
    return rounds


def _check_input(B: torch.Tensor) -> None:
    if not isinstance(B, torch.Tensor) or B.dim() != 3:
        raise ValueError(f"B must be a 3-D tensor [b, r, c], got {getattr(B, 'shape', type(B))}")
    if B.dtype != torch.float32:
        raise TypeError(f"B must be float32, got {B.dtype}")
    r, c = B.shape[1:]
    if max(r, c) > MAX_DIM:
        raise ValueError(f"B's matrices must be at most {MAX_DIM} x {MAX_DIM}, got {r} x {c}")
    # NaN/inf would give the CUDA kernel duplicate ranks (unwritten output slots) and, for a column
    # of NaN/inf, no pivot row at all (an out-of-bounds read): refuse them up front
    check_finite(B, "B")


def _finish(G: torch.Tensor, Vacc: torch.Tensor, transposed: bool):
    """Singular values, normalization, descending sort and sign normalization (step 3-4)."""
    S = torch.linalg.vector_norm(G, dim=2)  # [b, k]
    long_vecs = torch.where(S[..., None] > 0, G / torch.where(S > 0, S, 1.0)[..., None], torch.zeros_like(G))
    # stable descending sort: ties keep the original column order
    order = torch.sort(S, dim=1, descending=True, stable=True).indices
    S = torch.gather(S, 1, order)
    idx = order[..., None]
    long_vecs = torch.gather(long_vecs, 1, idx.expand_as(long_vecs))  # [b, k, L]
    short_vecs = torch.gather(Vacc, 1, idx.expand_as(Vacc))  # [b, k, k]
    Ucols, Vcols = (short_vecs, long_vecs) if transposed else (long_vecs, short_vecs)  # [b, k, r], [b, k, c]
    if Ucols.shape[-1] > 0:
        pos = Ucols.abs().argmax(dim=2, keepdim=True)  # first index of the max on ties
        sign = torch.where(torch.gather(Ucols, 2, pos) < 0, -1.0, 1.0)
        Ucols = Ucols * sign
        Vcols = Vcols * sign
    f32 = torch.float32
    return Ucols.transpose(1, 2).to(f32).contiguous(), S.to(f32).contiguous(), Vcols.transpose(1, 2).to(f32).contiguous()


def _jacobi_reference(B: torch.Tensor, tol: float | None, max_sweeps: int):
    b, r, c = B.shape
    transposed = r < c
    k = min(r, c)
    tol = DEFAULT_TOL if tol is None else float(tol)
    # G[j] = column j of B (r >= c) or of B^T (r < c), i.e. G = B^T or B, as [b, k, L]
    G = (B if transposed else B.transpose(1, 2)).to(torch.float64).contiguous().clone()
    Vacc = torch.eye(k, dtype=torch.float64, device=B.device).expand(b, k, k).contiguous()
    rounds = [(torch.tensor(p, dtype=torch.long, device=B.device), torch.tensor(q, dtype=torch.long, device=B.device))
              for p, q in round_robin_pairs(k) if p]
    for _sweep in range(max_sweeps):
        rotated = False
        for p, q in rounds:
            gp, gq = G[:, p, :], G[:, q, :]  # [b, P, L]
            alpha = (gp * gp).sum(-1)
            beta = (gq * gq).sum(-1)
            gamma = (gp * gq).sum(-1)
            rot = gamma.abs() > tol * torch.sqrt(alpha * beta)
            if not bool(rot.any()):
                continue
            rotated = True
            g_safe = torch.where(rot, gamma, 1.0)
            zeta = (beta - alpha) / (2.0 * g_safe)
            t = torch.where(zeta >= 0, 1.0, -1.0) / (zeta.abs() + torch.sqrt(1.0 + zeta * zeta))
            cs = 1.0 / torch.sqrt(1.0 + t * t)
            sn = cs * t
            cs = torch.where(rot, cs, 1.0)[..., None]
            sn = torch.where(rot, sn, 0.0)[..., None]
            G[:, p, :], G[:, q, :] = cs * gp - sn * gq, sn * gp + cs * gq
            vp, vq = Vacc[:, p, :], Vacc[:, q, :]
            Vacc[:, p, :], Vacc[:, q, :] = cs * vp - sn * vq, sn * vp + cs * vq
        if not rotated:
            break
    return _finish(G, Vacc, transposed)


# ----------------------------------------------------------------------------------------------
# CUDA backend
# ----------------------------------------------------------------------------------------------


def _cuda_lib():
    from fastmodels._cuda import load_library

    lib = load_library("jacobi_svd", ["jacobi_svd.cu"])
    fn = lib.fastmodels_jacobi_svd_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # B, U, S, V, work
        ctypes.c_int, ctypes.c_int, ctypes.c_int,  # batch, r, c
        ctypes.c_double, ctypes.c_int,  # tol, max_sweeps
        ctypes.c_void_p,  # stream
    ]
    return fn


def _jacobi_cuda(B: torch.Tensor, tol: float | None, max_sweeps: int):
    if B.device.type != "cuda":
        raise ValueError(f"backend='cuda' needs B on a CUDA device, got {B.device}")
    B = B.contiguous()
    b, r, c = B.shape
    k, L = min(r, c), max(r, c)
    tol = DEFAULT_TOL if tol is None else float(tol)
    U = torch.empty((b, r, k), device=B.device, dtype=torch.float32)
    S = torch.empty((b, k), device=B.device, dtype=torch.float32)
    V = torch.empty((b, c, k), device=B.device, dtype=torch.float32)
    if b == 0 or k == 0:
        return U, S, V
    # fp64 global workspace per matrix: G [k, L], Vacc [k, k], S [k] (used when they do not fit in shared memory)
    work = torch.empty((b, k * L + k * k + k), device=B.device, dtype=torch.float64)
    fn = _cuda_lib()
    stream = torch.cuda.current_stream(B.device).cuda_stream
    with torch.cuda.device(B.device):
        status = fn(B.data_ptr(), U.data_ptr(), S.data_ptr(), V.data_ptr(), work.data_ptr(), b, r, c,
                    ctypes.c_double(tol), int(max_sweeps), ctypes.c_void_p(stream))
    if status != 0:
        raise RuntimeError(f"fastmodels_jacobi_svd_f32 failed with CUDA error {status}")
    return U, S, V


def jacobi_svd(B: torch.Tensor, backend: str = "reference", *, tol: float | None = None, max_sweeps: int = DEFAULT_MAX_SWEEPS):
    """One-sided Jacobi SVD of a batch of small fp32 matrices.

    Args:
        B: [b, r, c] float32, r, c <= 512.
        backend: "reference" (vectorized PyTorch, any device) or "cuda" (csrc/cuda/jacobi_svd.cu,
            one matrix per thread block).
        tol: rotate a column pair while |cos| of their angle exceeds tol (default 1e-8).
        max_sweeps: at most this many sweeps.

    Returns:
        U [b, r, k], S [b, k] descending, V [b, c, k] with k = min(r, c), B ~= U diag(S) V^T.
    """
    _check_input(B)
    if not isinstance(max_sweeps, int) or max_sweeps < 1:
        raise ValueError(f"max_sweeps must be a positive int, got {max_sweeps!r}")
    if backend == "reference":
        return _jacobi_reference(B, tol, max_sweeps)
    if backend == "cuda":
        return _jacobi_cuda(B, tol, max_sweeps)
    raise ValueError(f"backend must be 'reference' or 'cuda', got {backend!r}")
