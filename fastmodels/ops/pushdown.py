"""Pushdown attention (Murty et al., "Pushdown Layers", EMNLP 2023): causal attention whose score
gains a learned term for the stack depth of each key as seen by the query,

    score(t, j) = scale * (q_t . k_j + q_t . E[min(S(t, j), V - 1)])     (binary: E[S(t, j) > 0])

with S the stack tape (``fastmodels.pushdown.StackTape``, or a dense integer [B, Tq, Tk] tensor).

Backends:

* ``reference`` -- the gather form in plain PyTorch: QE = q E^T ([Tq, V] per head), bias =
  QE[t, S(t, j)] taken along the dense tape, then softmax attention. Float64-capable, autograd by
  PyTorch. ``pushdown_attention_materialized`` is the authors' form q . (k + E[S]) (tests only: it
  builds a [B, H, Tq, Tk, D] tensor).
* ``cpu`` -- a blocked (FlashAttention-style) form on CPU: query blocks of 16-256 rows (a ~3 MiB
  score block); the GEMMs (q k^T, q E^T, P V and the backward's five) run in ATen, and one fused
  C++ pass per block (csrc/cpu/pushdown.cpp) regenerates S row by row from the compact tape
  (never a T x T integer tensor), adds the depth gather, masks and takes the softmax. The
  backward recomputes P from the saved log-sum-exp and accumulates the per-row depth histogram
  H[t, v] = sum_j dS[t, j] [S(t, j) = v] in the same pass, so dq += H E and dE += H^T q need
  no T x T buffer either.
* ``triton`` -- the fused FlashAttention-2 kernels of ``fastmodels.kernels.pushdown`` (S generated
  in-kernel from the compact tape, or read from a dense int tile).

The ``cpu`` and ``triton`` backends are ``torch.library.custom_op``s (``fastmodels::pushdown_attention_fwd``
/ ``_bwd``) with fake implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from fastmodels._autocast import autocast_dtype, autocast_off, cast_to
from fastmodels._dispatch import constant_under_compile, cpp_symbol_check, register_op, select_backend
from fastmodels._validation import FLOAT_DTYPES, INT_DTYPES, check_bool, check_float, check_tensor

__all__ = [
    "pushdown_attention",
    "pushdown_attention_reference",
    "pushdown_attention_materialized",
    "pushdown_attention_blocked",
]

OP = "pushdown_attention"


register_op(OP, ("reference", "cpu", "triton"), cpu=("cpu", "reference"), cuda=("triton", "reference"), check=cpp_symbol_check("pushdown_fwd_block", "pushdown"))

_BLOCK_BYTES = 3 << 20  # the cpu backend's score block [B, H, BM, Tk] stays near 3 MiB
# Query rows up to which the cpu forward is one fused C++ call (dot products, no GEMMs): a
# decoding step's few rows, where ATen's GEMM dispatch and the score buffers outweigh the math.
_DECODE_ROWS = 2


def _block_rows(B: int, H: int, Tq: int, Tk: int, itemsize: int) -> int:
    """Query rows per block of the cpu backend: 16..256, a multiple of 16, and at most Tq (a
    decoding step's buffers hold its own rows only: 256-row buffers are fresh mmaps, page-faulted
    on every call)."""
    rows = _BLOCK_BYTES // max(B * H * Tk * itemsize, 1)
    return int(min(256, max(16, rows // 16 * 16), max(Tq, 1)))


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _depth_index(S: torch.Tensor, V: int, binary: bool) -> torch.Tensor:
    """Row index into the depth table for tape values S: clamped to [0, V - 1] (a new tensor; the
    caller's tape is never modified), or [S > 0] in binary mode."""
    if binary:
        return (S > 0).to(torch.int64)
    return S.to(torch.int64).clamp(0, V - 1)


def _per_head(emb: torch.Tensor, H: int) -> torch.Tensor:
    """[V, D] (shared) or [H, V, D] table -> an [H, V, D] view (shared tables are expanded)."""
    return emb.unsqueeze(0).expand(H, *emb.shape) if emb.dim() == 2 else emb


def _causal_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    """True where key j is visible to query i (query i sits at absolute position Tk - Tq + i)."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i


# ---------------------------------------------------------------------------------------------
# Reference (gather form) and the authors' materialized form
# ---------------------------------------------------------------------------------------------


def pushdown_attention_reference(q, k, v, depth_emb, dense, *, scale: float, binary: bool = False) -> torch.Tensor:
    """Gather form: bias[t, j] = (q_t E^T)[S(t, j)]. ``dense``: [B, Tq, Tk] integer tape."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    E = _per_head(depth_emb, H).to(q.dtype)
    V = E.shape[1]
    qe = torch.einsum("bhtd,hvd->bhtv", q, E)  # [B, H, Tq, V]
    idx = _depth_index(dense, V, binary)[:, None].expand(B, H, Tq, Tk)
    bias = torch.gather(qe, -1, idx)
    scores = (q @ k.transpose(-1, -2) + bias) * scale
    scores = scores.masked_fill(~_causal_mask(Tq, Tk, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def pushdown_attention_materialized(q, k, v, depth_emb, dense, *, scale: float, binary: bool = False) -> torch.Tensor:
    """The authors' form: score = q . (k_j + E[S(t, j)]) with E[S] built as [B, H, Tq, Tk, D].

    Memory O(B H Tq Tk D): for tests and as a benchmark peer only."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    E = _per_head(depth_emb, H).to(q.dtype)
    V = E.shape[1]
    idx = _depth_index(dense, V, binary)  # [B, Tq, Tk]
    heads = torch.arange(H, device=q.device)[None, :, None, None]
    keys = k[:, :, None, :, :] + E[heads, idx[:, None]]  # [B, H, Tq, Tk, D]
    scores = torch.einsum("bhtd,bhtjd->bhtj", q, keys) * scale
    scores = scores.masked_fill(~_causal_mask(Tq, Tk, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---------------------------------------------------------------------------------------------
# cpu backend: blocked forward / backward with S regenerated per query block
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpp():
    import fastmodels._C as C

    return C


def _int32_tape(S: torch.Tensor) -> torch.Tensor:
    """An integer tape as int32, saturating instead of wrapping: depths beyond V - 1 all mean row
    V - 1, and negatives (unchecked under torch.compile) read row 0."""
    if S.dtype == torch.int64:
        S = S.clamp(0, 2**31 - 1)
    return S.to(torch.int32)


def _block_dense(dense, r0: int, r1: int, kend: int):
    """The dense tape rows of a query block as a contiguous int32 [B, m, kend] tensor."""
    if dense is None:
        return None
    return _int32_tape(dense[:, r0:r1, :kend]).contiguous()


def _threads() -> int:
    """Threads of the C++ pass: torch's intra-op thread count. On the 2-core dev machine, idle,
    T=1024 fwd+bwd: 67.8 ms with one thread, 47.8 ms with two (SDPA: 36-37 ms). With two other
    busy processes on the 2 cores: 226-229 ms with one thread, 193-258 ms with two (SDPA 82-112
    ms): contention hurts the blocked form (ATen GEMMs and this pass alternate, each a parallel
    region per query block) more than SDPA's single fused kernel, with or without a second thread
    here. The pass hands out rows dynamically, so a descheduled thread delays only its chunk."""
    return max(1, torch.get_num_threads())


def _buffer_view(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous [shape] view on the front of a flat buffer reused by every block (fresh
    large allocations per block cost page faults that dominated the CPU time)."""
    return buf[: math.prod(shape)].view(shape)


def _ptr(x) -> int:
    return 0 if x is None else x.data_ptr()


def _rows_in_place(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` itself when it has ``dtype`` and contiguous rows over its last two dims (any strides
    outside them: the prefix view of a decoding cache's capacity buffer), else a contiguous copy
    in ``dtype``. The C++ kernels that take the outer strides read the former without a copy."""
    if x.dtype == dtype and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.to(dtype).contiguous()


def _decode_fwd(q, k, v, emb, depth, boundary, dense, scale: float, binary: bool):
    """Forward of at most _DECODE_ROWS query rows as one fused C++ call (no GEMMs). ``emb``: the
    table as given, [V, D] (shared) or [H, V, D]."""
    B, H, Tq, D = q.shape
    cd = _compute_dtype(q.dtype)
    qf, table = (t if t.dtype == cd and t.is_contiguous() else t.to(cd).contiguous() for t in (q, emb))
    kf, vf = _rows_in_place(k, cd), _rows_in_place(v, cd)
    out = torch.empty(B, H, Tq, D, dtype=cd, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=cd, device=q.device)
    rows = _block_dense(dense, 0, Tq, k.shape[2])  # [B, Tq, Tk] int32, or None
    _cpp().pushdown_decode_fwd(
        qf.data_ptr(), kf.data_ptr(), vf.data_ptr(), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        table.data_ptr(), table.dim() == 3, out.data_ptr(), lse.data_ptr(), _ptr(depth), _ptr(boundary), _ptr(rows),
        B, H, Tq, k.shape[2], D, emb.shape[-2], binary, scale, cd == torch.float64, _threads(),
    )
    return (out if out.dtype == q.dtype else out.to(q.dtype)), lse


def _blocked_fwd(q, k, v, emb, depth, boundary, dense, scale: float, binary: bool):
    """Blocked forward: per block of query rows, ATen GEMMs around one fused C++ pass."""
    C = _cpp()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    off = Tk - Tq
    cd = _compute_dtype(q.dtype)
    qf = q.to(cd)  # s = q k^T and QE = q E^T unscaled; the C++ pass applies the scale
    kf, vf = k.to(cd), v.to(cd)
    Et = emb.to(cd).transpose(1, 2)  # [H, D, V]
    V = Et.shape[2]
    bm = _block_rows(B, H, Tq, Tk, qf.element_size())
    if Tq <= bm:  # one block (decoding steps, short sequences): no staging buffers or copies
        s = torch.matmul(qf, kf.transpose(-1, -2))
        qe = torch.matmul(qf, Et)
        lse = torch.empty(B, H, Tq, dtype=cd, device=q.device)
        blk = _block_dense(dense, 0, Tq, Tk)
        C.pushdown_fwd_block(
            s.data_ptr(), qe.data_ptr(), lse.data_ptr(), _ptr(depth), _ptr(boundary), _ptr(blk),
            B, H, Tq, Tk, off, Tk, V, binary, scale, cd == torch.float64, _threads(),
        )
        return torch.matmul(s, vf).to(q.dtype), lse
    out = torch.empty(B, H, Tq, D, dtype=cd, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=cd, device=q.device)
    s_buf = torch.empty(B * H * bm * Tk, dtype=cd, device=q.device)
    qe_buf = torch.empty(B * H * bm * V, dtype=cd, device=q.device)
    lse_buf = torch.empty(B * H * bm, dtype=cd, device=q.device)
    o_buf = torch.empty(B * H * bm * D, dtype=cd, device=q.device)
    for r0 in range(0, Tq, bm):
        r1 = min(r0 + bm, Tq)
        m, kend = r1 - r0, off + r1
        qb = qf[:, :, r0:r1]
        s = torch.matmul(qb, kf[:, :, :kend].transpose(-1, -2), out=_buffer_view(s_buf, B, H, m, kend))
        qe = torch.matmul(qb, Et, out=_buffer_view(qe_buf, B, H, m, V))
        blk = _block_dense(dense, r0, r1, kend)
        lse_b = _buffer_view(lse_buf, B, H, m)
        C.pushdown_fwd_block(
            s.data_ptr(), qe.data_ptr(), lse_b.data_ptr(), _ptr(depth), _ptr(boundary), _ptr(blk),
            B, H, m, kend, off + r0, Tk, V, binary, scale, cd == torch.float64, _threads(),
        )
        out[:, :, r0:r1] = torch.matmul(s, vf[:, :, :kend], out=_buffer_view(o_buf, B, H, m, D))
        lse[:, :, r0:r1] = lse_b
    return out.to(q.dtype), lse


def _blocked_bwd(do, q, k, v, emb, depth, boundary, dense, out, lse, scale: float, binary: bool):
    """Blocked backward: P recomputed from the saved lse; dS and the depth histogram
    H[t, v] = sum_j dS[t, j] [idx(t, j) = v] in one fused C++ pass per block (dS includes the
    scale); then dq = dS k + H E, dk = dS^T q, dv = P^T dO, dE = H^T q (per head; summed over
    the batch once at the end)."""
    C = _cpp()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    off = Tk - Tq
    cd = _compute_dtype(q.dtype)
    qf = q.to(cd)
    kf, vf, dof = k.to(cd), v.to(cd), do.to(cd)
    E = emb.to(cd)
    Et = E.transpose(1, 2)
    V = E.shape[1]
    lse = lse.to(cd)
    delta = (dof * out.to(cd)).sum(-1)  # [B, H, Tq]
    dq = torch.empty(B, H, Tq, D, dtype=cd, device=q.device)
    dk = torch.zeros(B, H, Tk, D, dtype=cd, device=q.device)
    dv = torch.zeros(B, H, Tk, D, dtype=cd, device=q.device)
    demb = torch.zeros(B * H, V, D, dtype=cd, device=q.device)  # per (batch, head)
    bm = _block_rows(B, H, Tq, Tk, qf.element_size())
    s_buf = torch.empty(B * H * bm * Tk, dtype=cd, device=q.device)
    dp_buf = torch.empty(B * H * bm * Tk, dtype=cd, device=q.device)
    kd_buf = torch.empty(B * H * Tk * D, dtype=cd, device=q.device)  # dk / dv contributions of a block
    qe_buf = torch.empty(B * H * bm * V, dtype=cd, device=q.device)
    hist_buf = torch.empty(B * H * bm * V, dtype=cd, device=q.device)
    dq_buf = torch.empty(B * H * bm * D, dtype=cd, device=q.device)
    for r0 in range(0, Tq, bm):
        r1 = min(r0 + bm, Tq)
        m, kend = r1 - r0, off + r1
        qb, dob = qf[:, :, r0:r1], dof[:, :, r0:r1]
        kb, vb = kf[:, :, :kend], vf[:, :, :kend]
        s = torch.matmul(qb, kb.transpose(-1, -2), out=_buffer_view(s_buf, B, H, m, kend))
        dp = torch.matmul(dob, vb.transpose(-1, -2), out=_buffer_view(dp_buf, B, H, m, kend))
        qe = torch.matmul(qb, Et, out=_buffer_view(qe_buf, B, H, m, V))
        hist = _buffer_view(hist_buf, B, H, m, V)
        blk = _block_dense(dense, r0, r1, kend)
        lse_b, delta_b = lse[:, :, r0:r1].contiguous(), delta[:, :, r0:r1].contiguous()
        C.pushdown_bwd_block(
            s.data_ptr(), dp.data_ptr(), qe.data_ptr(), lse_b.data_ptr(), delta_b.data_ptr(), hist.data_ptr(),
            _ptr(depth), _ptr(boundary), _ptr(blk), B, H, m, kend, off + r0, Tk, V, binary, scale, cd == torch.float64, _threads(),
        )
        dv[:, :, :kend] += torch.matmul(s.transpose(-1, -2), dob, out=_buffer_view(kd_buf, B, H, kend, D))
        dk[:, :, :kend] += torch.matmul(dp.transpose(-1, -2), qb, out=_buffer_view(kd_buf, B, H, kend, D))
        dqb = torch.matmul(dp, kb, out=_buffer_view(dq_buf, B, H, m, D))
        dqb += torch.matmul(hist, E)
        dq[:, :, r0:r1] = dqb
        # one bmm over (batch, head): half the time of einsum("bhmv,bhmd->hvd"), which copies
        demb.baddbmm_(hist.view(B * H, m, V).transpose(1, 2), qb.reshape(B * H, m, D))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), demb.view(B, H, V, D).sum(0)


def pushdown_attention_blocked(q, k, v, depth_emb, depth=None, boundary=None, dense=None, *, scale: float, binary: bool = False):
    """The cpu backend's blocked forward without autograd: (out, lse). For benchmarks and tests."""
    return _blocked_fwd(q, k, v, _per_head(depth_emb, q.shape[1]), depth, boundary, dense, scale, binary)


# ---------------------------------------------------------------------------------------------
# Custom ops (cpu and triton backends)
# ---------------------------------------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_tape(depth, boundary, dense):
    if dense is not None and dense.dtype not in (torch.int8, torch.int16, torch.int32):
        dense = _int32_tape(dense)
    return (
        None if depth is None else depth.contiguous(),
        None if boundary is None else boundary.contiguous(),
        None if dense is None else dense.contiguous(),
    )


@autocast_off
def _fwd_impl(q, k, v, emb, depth, boundary, dense, scale: float, binary: bool, backend: str):
    """(out, lse) on the chosen backend; ``emb`` is the table as given ([V, D] or [H, V, D])."""
    if backend == "cpu" and q.shape[2] <= _DECODE_ROWS:  # a decoding step's few query rows
        return _decode_fwd(q, k, v, emb, depth, boundary, dense, scale, binary)
    E = _per_head(emb, q.shape[1])  # a view: the kernels take any strides
    if backend == "triton":
        from fastmodels.kernels.pushdown import pushdown_attention_fwd

        depth, boundary, dense = _triton_tape(depth, boundary, dense)
        return pushdown_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), E, depth, boundary, dense, scale, binary)
    return _blocked_fwd(q, k, v, E, depth, boundary, dense, scale, binary)


# The Triton backward on a GPU: dq and the depth-table gradient came out wrong on an H200 (triton
# 3.6, commit d5741f9, bench/results/gpu_logs/2026-11-27-d5741f9) for every tested table of 50 rows
# (RMS errors 4-9% in dq, 15% in dE; fp32 and bf16; general and row-uniform tiles, both histogram
# forms), while tables of at most 5 rows, binary tapes, the forward, dk and dv were right. The same
# code is right under the Triton interpreter at the GPU's tile sizes, so the fault is in compiled
# code; until a GPU run finds and fixes it, such calls warn.
_GPU_VERIFIED_ROWS = 16
_GPU_DQ_FAULT = (
    "pushdown_attention: the Triton backward gave wrong dq and depth-table gradients on an H200 "
    f"(triton 3.6) for depth tables of more than {_GPU_VERIFIED_ROWS} rows (4-9% RMS error in dq, "
    "15% in the table's gradient; see README, Known issues); forward, dk and dv were right. "
    "backend='reference' computes exact gradients (materializing T x T scores); binary=True or a "
    f"table of at most {_GPU_VERIFIED_ROWS} rows avoids the fault"
)


@autocast_off
def _bwd_impl(do, q, k, v, emb, depth, boundary, dense, out, lse, scale: float, binary: bool, backend: str):
    """(dq, dk, dv, demb); demb has ``emb``'s shape (summed over heads for a shared table) in
    float32 (float64 for float64 inputs)."""
    E = _per_head(emb, q.shape[1])
    shared = emb.dim() == 2
    if backend == "triton":
        from fastmodels.kernels.pushdown import pushdown_attention_bwd

        if q.is_cuda and not binary and emb.shape[-2] > _GPU_VERIFIED_ROWS:
            warnings.warn(_GPU_DQ_FAULT, RuntimeWarning, stacklevel=2)

        depth, boundary, dense = _triton_tape(depth, boundary, dense)
        c = lambda x: x.contiguous()  # noqa: E731
        return pushdown_attention_bwd(c(do), c(q), c(k), c(v), E, depth, boundary, dense, c(out), c(lse), scale, binary, shared_table=shared)
    dq, dk, dv, demb = _blocked_bwd(do, q, k, v, E, depth, boundary, dense, out, lse, scale, binary)
    return dq, dk, dv, (demb.sum(0) if shared else demb)


@torch.library.custom_op("fastmodels::pushdown_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    emb: torch.Tensor,
    depth: Optional[torch.Tensor],
    boundary: Optional[torch.Tensor],
    dense: Optional[torch.Tensor],
    scale: float,
    binary: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, emb, depth, boundary, dense, scale, binary, backend)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, emb, depth, boundary, dense, scale, binary, backend):
    B, H, Tq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("fastmodels::pushdown_attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    emb: torch.Tensor,
    depth: Optional[torch.Tensor],
    boundary: Optional[torch.Tensor],
    dense: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    binary: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary, backend)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(emb.shape, dtype=_lse_dtype(q.dtype))


def _save(ctx, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary, backend):
    ctx.save_for_backward(q, k, v, emb, depth, boundary, dense, out, lse)
    ctx.scale, ctx.binary, ctx.backend = scale, binary, backend


def _saved_backward(ctx, dout, bwd):
    """Gradients of (q, k, v, emb) from what _save kept, through ``bwd`` (the custom op under
    torch.compile, the implementation in eager mode), then None for the 6 non-tensor inputs."""
    q, k, v, emb, depth, boundary, dense, out, lse = ctx.saved_tensors
    dq, dk, dv, demb = bwd(dout, q, k, v, emb, depth, boundary, dense, out, lse, ctx.scale, ctx.binary, ctx.backend)
    return dq, dk, dv, demb.to(emb.dtype), None, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    q, k, v, emb, depth, boundary, dense, scale, binary, backend = inputs
    _save(ctx, q, k, v, emb, depth, boundary, dense, *output, scale, binary, backend)


def _backward(ctx, dout, dlse):
    return _saved_backward(ctx, dout, _bwd_op)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerPushdown(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: a custom op's dispatch
    costs ~0.1-0.2 ms of host time per call, as much as the kernels themselves at T <= 1024.
    torch.compile traces the custom ops instead (see pushdown_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, emb, depth, boundary, dense, scale, binary, backend):
        out, lse = _fwd_impl(q, k, v, emb, depth, boundary, dense, scale, binary, backend)
        _save(ctx, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary, backend)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        return _saved_backward(ctx, dout, _bwd_impl)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_dense_tape(tape: torch.Tensor) -> None:
    """A dense tape has no negative depth: one host sync (skipped under torch.compile, where every
    backend reads negative depths as 0)."""
    if not _is_compiling() and tape.numel():
        low = int(tape.min())
        if low < 0:
            raise ValueError(f"tape: expected non-negative depths, got a minimum of {low}")


def check_tape_device(tape, device, device_of: str) -> None:
    """Refuse a tape (StackTape or tensor) that is not on ``device``, naming the argument
    ``device_of`` it came from: modules check their tape against their own input first, so that
    the op's error (which names its q) never reaches a module's user."""
    got = getattr(tape, "device", None)
    if got is not None and got != device:
        kind = "tensor" if isinstance(tape, torch.Tensor) else "StackTape"
        raise ValueError(f"tape: expected a {kind} on {device} (the device of {device_of}), got one on {got}")


def unpack_tape(tape, B: int, Tq: int, Tk: int, device, check_values: bool, keys_name: str = "k"):
    """(depth, boundary, dense) of an op's ``tape`` argument, checked against the batch B, the Tq
    queries and Tk keys on ``device``: a StackTape gives (depth, boundary, None), a dense integer
    [B, Tq, Tk] tensor (None, None, tape)."""
    from fastmodels.pushdown.tape import StackTape

    if isinstance(tape, StackTape):
        if tape.batch_size != B or tape.seq_len != Tk:
            raise ValueError(f"tape: expected a StackTape of batch size {B} and length {Tk} (from q and {keys_name}), got {tape.batch_size} x {tape.seq_len}")
        if tape.device != device:
            raise ValueError(f"tape: expected a StackTape on {device} (the device of q), got one on {tape.device} (use tape.to(device))")
        return tape.depth, tape.boundary, None
    if isinstance(tape, torch.Tensor):
        check_tensor(tape, "tape", shape=(B, Tq, Tk), dtypes=INT_DTYPES, device=device, device_of="q")
        if check_values:
            check_dense_tape(tape)
        return None, None, tape
    raise TypeError(f"tape: expected a StackTape or an integer tensor [B, Tq, Tk], got {type(tape).__name__}")


@constant_under_compile
def _choose_backend(backend: Optional[str], device_type: str) -> str:
    return select_backend(OP, backend, device_type)


def pushdown_attention(q, k, v, depth_emb, tape, *, scale=None, binary: bool = False, backend=None,
                       check_values: bool = True) -> torch.Tensor:
    """Causal attention with a stack-depth term: softmax(scale (q k^T + q E[S]^T)) v.

    Args:
        q: [B, H, Tq, D] queries; k, v: [B, H, Tk, D] keys and values (Tq <= Tk; queries are the
            last Tq positions, as with a KV cache). fp16, bf16, fp32 or fp64, one dtype.
        depth_emb: the depth table E, [V, D] (shared by heads) or [H, V, D]; floating point.
            Depths are clamped to V - 1.
        tape: a ``fastmodels.pushdown.StackTape`` (compact; its batch size and length must equal
            B and Tk) or a dense integer tensor [B, Tq, Tk] with S(t, j) >= 0 (predicted or
            beam-search tapes; one row per query, so decoding passes the current depth row).
        scale: softmax scale (default 1/sqrt(D)).
        binary: use E[S > 0] (the Dyck 0/1 tape) instead of E[min(S, V - 1)].
        backend: None (automatic), "reference", "cpu" or "triton".
        check_values: check that a dense tape has no negative depth (one host sync per call, so
            one per layer and decoding step; skipped under torch.compile). With False, negative
            depths read as 0 on every backend.

    Under ``torch.autocast``, q, k, v and depth_emb are first cast to autocast's dtype (float64
    stays), as ``scaled_dot_product_attention`` does, and the op runs on them in that dtype.

    Returns: [B, H, Tq, D] in q's dtype. Differentiable in q, k, v and depth_emb.
    """
    low = autocast_dtype(q)
    if low is not None:
        with torch.autocast(q.device.type, enabled=False):
            return pushdown_attention(cast_to(q, low), cast_to(k, low), cast_to(v, low), cast_to(depth_emb, low), tape, scale=scale,
                                      binary=binary, backend=backend, check_values=check_values)
    dims: dict = {}
    check_tensor(q, "q", shape=("B", "H", "Tq", "D"), dims=dims, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", shape=("B", "H", "Tk", "D"), dims=dims, dtypes=(q.dtype,), device=q.device, dtype_of="q", device_of="q")
    check_tensor(v, "v", shape=("B", "H", "Tk", "D"), dims=dims, dtypes=(q.dtype,), device=q.device, dtype_of="q", device_of="q")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if D < 1:
        raise ValueError(f"q: expected a head dimension D >= 1, got shape {list(q.shape)}")
    if Tq > Tk:
        raise ValueError(f"q: expected at most as many queries as keys (Tq <= Tk), got Tq={Tq}, Tk={Tk}")
    check_tensor(depth_emb, "depth_emb", ndim=(2, 3), dtypes=FLOAT_DTYPES, device=q.device, device_of="q")
    if depth_emb.dim() == 2:
        check_tensor(depth_emb, "depth_emb", shape=("V", "D"), dims=dims)
    else:
        check_tensor(depth_emb, "depth_emb", shape=("H", "V", "D"), dims=dims)
    V = depth_emb.shape[-2]
    if V < 1 or (binary and V < 2):
        raise ValueError(f"depth_emb: expected at least {2 if binary else 1} rows (V), got {V}")
    check_bool(binary, "binary")
    check_bool(check_values, "check_values")
    scale = 1.0 / math.sqrt(D) if scale is None else check_float(scale, "scale")

    depth, boundary, dense = unpack_tape(tape, B, Tq, Tk, q.device, check_values)

    if B * H * Tq == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum() + depth_emb.sum())

    chosen = _choose_backend(backend, q.device.type)
    if chosen == "reference":
        if dense is None:
            from fastmodels.pushdown.tape import dense_from_compact

            dense = dense_from_compact(depth, boundary, Tq)
        return pushdown_attention_reference(q, k, v, depth_emb, dense, scale=scale, binary=binary)
    if chosen == "triton":
        if q.dtype == torch.float64:
            raise TypeError("q: the triton backend does not support float64 (use backend='reference' or 'cpu')")
        if dense is None and Tq != Tk:
            from fastmodels.pushdown.tape import dense_from_compact

            dense, depth, boundary = dense_from_compact(depth, boundary, Tq).to(torch.int32), None, None
    if _is_compiling():
        out, _ = _fwd_op(q, k, v, depth_emb, depth, boundary, dense, scale, binary, chosen)
        return out
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or depth_emb.requires_grad)):
        return _fwd_impl(q, k, v, depth_emb, depth, boundary, dense, scale, binary, chosen)[0]  # inference: no autograd node
    return _EagerPushdown.apply(q, k, v, depth_emb, depth, boundary, dense, scale, binary, chosen)
