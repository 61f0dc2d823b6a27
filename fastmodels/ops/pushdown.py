"""Pushdown attention (Murty et al., "Pushdown Layers", EMNLP 2023): causal attention whose score
gains a learned term for the stack depth of each key as seen by the query,

    score(t, j) = scale * (q_t . k_j + q_t . E[min(S(t, j), V - 1)])     (binary: E[S(t, j) > 0])

with S the stack tape (``fastmodels.pushdown.StackTape``, or a dense integer [B, Tq, Tk] tensor).

Backends:

* ``reference`` -- the gather form in plain PyTorch: QE = q E^T ([Tq, V] per head), bias =
  QE[t, S(t, j)] taken along the dense tape, then softmax attention. Float64-capable, autograd by
  PyTorch. ``pushdown_attention_materialized`` is the authors' form q . (k + E[S]) (tests only: it
  builds a [B, H, Tq, Tk, D] tensor).
* ``cpu`` -- a blocked (FlashAttention-style) form on CPU: query blocks of 64 rows, S regenerated
  per block from the compact tape (never a T x T integer tensor), scores, depth gather, softmax and
  P V per block through ATen GEMMs; the backward recomputes P from the saved log-sum-exp and
  accumulates the per-row depth histogram H[t, v] = sum_j dS[t, j] [S(t, j) = v] per block, so
  dq += H E and dE += H^T q need no T x T buffer.
* ``triton`` -- the fused FlashAttention-2 kernels of ``fastmodels.kernels.pushdown`` (S generated
  in-kernel from the compact tape, or read from a dense int tile).

The ``cpu`` and ``triton`` backends are ``torch.library.custom_op``s (``fastmodels::pushdown_attention_fwd``
/ ``_bwd``) with fake implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastmodels._dispatch import register_op, select_backend
from fastmodels._validation import FLOAT_DTYPES, INT_DTYPES, check_float, check_tensor

__all__ = [
    "pushdown_attention",
    "pushdown_attention_reference",
    "pushdown_attention_materialized",
    "pushdown_attention_blocked",
]

OP = "pushdown_attention"
register_op(OP, ("reference", "cpu", "triton"), cpu=("cpu", "reference"), cuda=("triton", "reference"))

_BLOCK_M = 64  # query rows per block of the cpu backend


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _depth_index(S: torch.Tensor, V: int, binary: bool) -> torch.Tensor:
    """Row index into the depth table for tape values S (int64)."""
    if binary:
        return (S > 0).to(torch.int64)
    return S.to(torch.int64).clamp_(max=V - 1)


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


def _block_tape(depth, boundary, dense, r0: int, r1: int, offset: int, kend: int) -> torch.Tensor:
    """S for query rows r0..r1-1 (absolute positions offset + r) and keys 0..kend-1, int64."""
    if dense is not None:
        return dense[:, r0:r1, :kend].to(torch.int64)
    t0, t1 = offset + r0, offset + r1  # absolute query positions; kend == t1
    c = boundary.to(torch.int64)
    d = depth[:, :kend].to(torch.int64)
    m = t1 - t0
    # min over c[t0..t] for every query row of the block
    pm = torch.cummin(c[:, t0:t1], dim=1).values  # [B, m]
    parts = []
    if t0 > 0:
        # min over c[j..t0-1] for keys before the block: a reverse running minimum
        sm = torch.cummin(c[:, :t0].flip(1), dim=1).values.flip(1)  # [B, t0]
        parts.append(torch.minimum(sm[:, None, :], pm[:, :, None]))  # [B, m, t0]
    # keys inside the block: min over c[j..t] for j <= t (running min along t of c masked to k >= j)
    ar = torch.arange(m, device=c.device)
    upper = ar[None, :] >= ar[:, None]  # [j, k]: k >= j
    big = torch.iinfo(torch.int64).max
    masked = torch.where(upper[None], c[:, None, t0:t1], big)  # [B, j, k]
    tri = torch.cummin(masked, dim=2).values.transpose(1, 2)  # [B, t, j]
    parts.append(tri)
    running = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    S = d[:, None, :] - running
    # j > t inside the diagonal block: huge negative garbage; those scores are masked, clamp to 0
    return S.clamp_(min=0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocked_fwd(q, k, v, emb, depth, boundary, dense, scale: float, binary: bool):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    off = Tk - Tq
    cd = _compute_dtype(q.dtype)
    qf, kf, vf, E = (x.to(cd) for x in (q, k, v, emb))
    V = E.shape[1]
    Et = E.transpose(1, 2)  # [H, D, V]
    out = torch.empty(B, H, Tq, D, dtype=cd, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=cd, device=q.device)
    for r0 in range(0, Tq, _BLOCK_M):
        r1 = min(r0 + _BLOCK_M, Tq)
        m, kend = r1 - r0, off + r1
        qb = qf[:, :, r0:r1]
        idx = _depth_index(_block_tape(depth, boundary, dense, r0, r1, off, kend), V, binary)
        s = torch.matmul(qb, kf[:, :, :kend].transpose(-1, -2))  # [B, H, m, kend]
        s.add_(torch.gather(torch.matmul(qb, Et), -1, idx[:, None].expand(B, H, m, kend)))
        s.mul_(scale)
        diag = s[..., kend - m :]
        diag.masked_fill_(~torch.ones(m, m, dtype=torch.bool, device=q.device).tril_(), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        s.sub_(row_lse[..., None]).exp_()
        torch.matmul(s, vf[:, :, :kend], out=out[:, :, r0:r1])
        lse[:, :, r0:r1] = row_lse
    return out.to(q.dtype), lse


def _blocked_bwd(do, q, k, v, emb, depth, boundary, dense, out, lse, scale: float, binary: bool):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    off = Tk - Tq
    cd = _compute_dtype(q.dtype)
    qf, kf, vf, E, dof, of = (x.to(cd) for x in (q, k, v, emb, do, out))
    V = E.shape[1]
    Et = E.transpose(1, 2)
    delta = (dof * of).sum(-1)  # [B, H, Tq]
    dq = torch.empty(B, H, Tq, D, dtype=cd, device=q.device)
    dk = torch.zeros(B, H, Tk, D, dtype=cd, device=q.device)
    dv = torch.zeros(B, H, Tk, D, dtype=cd, device=q.device)
    demb = torch.zeros(H, V, D, dtype=cd, device=q.device)
    for r0 in range(0, Tq, _BLOCK_M):
        r1 = min(r0 + _BLOCK_M, Tq)
        m, kend = r1 - r0, off + r1
        qb, dob = qf[:, :, r0:r1], dof[:, :, r0:r1]
        idx = _depth_index(_block_tape(depth, boundary, dense, r0, r1, off, kend), V, binary)
        idx = idx[:, None].expand(B, H, m, kend)
        kb, vb = kf[:, :, :kend], vf[:, :, :kend]
        # recompute P
        p = torch.matmul(qb, kb.transpose(-1, -2))
        p.add_(torch.gather(torch.matmul(qb, Et), -1, idx))
        p.mul_(scale)
        p[..., kend - m :].masked_fill_(~torch.ones(m, m, dtype=torch.bool, device=q.device).tril_(), float("-inf"))
        p.sub_(lse[:, :, r0:r1, None]).exp_()
        dv[:, :, :kend].add_(torch.matmul(p.transpose(-1, -2), dob))
        ds = torch.matmul(dob, vb.transpose(-1, -2))  # dP
        ds.sub_(delta[:, :, r0:r1, None]).mul_(p).mul_(scale)  # d(score before scaling)
        del p
        hist = torch.zeros(B, H, m, V, dtype=cd, device=q.device).scatter_add_(-1, idx, ds)
        dk[:, :, :kend].add_(torch.matmul(ds.transpose(-1, -2), qb))
        dqb = torch.matmul(ds, kb)
        dqb.add_(torch.matmul(hist, E))
        dq[:, :, r0:r1] = dqb
        demb.add_(torch.einsum("bhmv,bhmd->hvd", hist, qb))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), demb


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
        dense = dense.to(torch.int32)
    return (
        None if depth is None else depth.contiguous(),
        None if boundary is None else boundary.contiguous(),
        None if dense is None else dense.contiguous(),
    )


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
    if backend == "triton":
        from fastmodels.kernels.pushdown import pushdown_attention_fwd

        depth, boundary, dense = _triton_tape(depth, boundary, dense)
        return pushdown_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), emb.contiguous(), depth, boundary, dense, scale, binary)
    return _blocked_fwd(q, k, v, emb, depth, boundary, dense, scale, binary)


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
    if backend == "triton":
        from fastmodels.kernels.pushdown import pushdown_attention_bwd

        depth, boundary, dense = _triton_tape(depth, boundary, dense)
        c = lambda x: x.contiguous()  # noqa: E731
        return pushdown_attention_bwd(c(do), c(q), c(k), c(v), c(emb), depth, boundary, dense, c(out), c(lse), scale, binary)
    return _blocked_bwd(do, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(emb.shape, dtype=_lse_dtype(q.dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, emb, depth, boundary, dense, scale, binary, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, emb, depth, boundary, dense, out, lse)
    ctx.scale, ctx.binary, ctx.backend = scale, binary, backend
    ctx.emb_dtype = emb.dtype


def _backward(ctx, dout, dlse):
    q, k, v, emb, depth, boundary, dense, out, lse = ctx.saved_tensors
    dq, dk, dv, demb = _bwd_op(dout, q, k, v, emb, depth, boundary, dense, out, lse, ctx.scale, ctx.binary, ctx.backend)
    return dq, dk, dv, demb.to(ctx.emb_dtype), None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def _choose_backend(backend: Optional[str], device_type: str) -> str:
    return select_backend(OP, backend, device_type)


def pushdown_attention(q, k, v, depth_emb, tape, *, scale=None, binary: bool = False, backend=None) -> torch.Tensor:
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

    Returns: [B, H, Tq, D] in q's dtype. Differentiable in q, k, v and depth_emb.
    """
    from fastmodels.pushdown.tape import StackTape

    dims: dict = {}
    check_tensor(q, "q", shape=("B", "H", "Tq", "D"), dims=dims, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", shape=("B", "H", "Tk", "D"), dims=dims, dtypes=(q.dtype,), device=q.device)
    check_tensor(v, "v", shape=("B", "H", "Tk", "D"), dims=dims, dtypes=(q.dtype,), device=q.device)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if Tq > Tk:
        raise ValueError(f"q: expected at most as many queries as keys (Tq <= Tk), got Tq={Tq}, Tk={Tk}")
    check_tensor(depth_emb, "depth_emb", ndim=(2, 3), dtypes=FLOAT_DTYPES, device=q.device)
    if depth_emb.dim() == 2:
        check_tensor(depth_emb, "depth_emb", shape=("V", "D"), dims=dims)
    else:
        check_tensor(depth_emb, "depth_emb", shape=("H", "V", "D"), dims=dims)
    V = depth_emb.shape[-2]
    if V < 1 or (binary and V < 2):
        raise ValueError(f"depth_emb: expected at least {2 if binary else 1} rows (V), got {V}")
    if not isinstance(binary, bool):
        raise TypeError(f"binary: expected a bool, got {type(binary).__name__}")
    scale = 1.0 / math.sqrt(D) if scale is None else check_float(scale, "scale")

    depth = boundary = dense = None
    if isinstance(tape, StackTape):
        if tape.batch_size != B or tape.seq_len != Tk:
            raise ValueError(f"tape: expected a StackTape of batch size {B} and length {Tk} (from q and k), got {tape.batch_size} x {tape.seq_len}")
        if tape.device != q.device:
            raise ValueError(f"tape: expected a StackTape on {q.device}, got one on {tape.device} (use tape.to(device))")
        depth, boundary = tape.depth, tape.boundary
    elif isinstance(tape, torch.Tensor):
        check_tensor(tape, "tape", shape=(B, Tq, Tk), dtypes=INT_DTYPES, device=q.device)
        if not _is_compiling() and tape.numel() and int(tape.min()) < 0:
            raise ValueError(f"tape: expected non-negative depths, got a minimum of {int(tape.min())}")
        dense = tape
    else:
        raise TypeError(f"tape: expected a StackTape or an integer tensor [B, Tq, Tk], got {type(tape).__name__}")

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
    emb = _per_head(depth_emb, H)
    out, _ = _fwd_op(q, k, v, emb, depth, boundary, dense, scale, binary, chosen)
    return out
