"""Attachment scores of a Pushdown LM's attachment head (Murty et al., "Pushdown Layers", EMNLP 2023;
spec section 4): at query position t, how strongly the next token attaches to key j,

    score(t, j) = sum_w q[t, w] * relu(keys[j, w] + depth_feat[idx(S(t, j)), w])      (j <= t)

with S the stack tape (as in ``pushdown_attention``), idx(S) = min(S, V - 1) (binary: [S > 0]),
and -inf above the causal diagonal. This is the authors' per-pair 2-layer MLP
q~ . MLP([k'_j ; E'[S(t, j)]]) with its first layer split over the concatenation
(W1 [k' ; e_d] + b1 = keys_j + depth_feat_d) and its second layer folded into the query
(q = W2^T q~; the q~ . b2 term is the same for every j): ~3 W FLOPs per (t, j) pair instead of
a full MLP, and no [B, T, T, W] tensor.

Backends:

* ``reference`` -- the factored form materialized in PyTorch ([B, Tq, Tk, W] pre-activations),
  float64-capable, autograd by PyTorch: the test oracle.
* ``cpu`` -- C++ (csrc/cpu/attachment.cpp, OpenMP). The pre-activation depends on a pair only
  through (key j, depth row v), and down a key column the depth changes only a few times, so the
  forward and the backward's dkeys/dfeat pass walk key columns in runs of equal depth (relu
  once per run, then dot products; the depth-table gradient in per-thread tables), and the dq
  pass walks query rows. S is regenerated from the compact tape, never stored.
* ``triton`` -- ``fastmodels.kernels.attachment``: the same row and column passes over tiles.

The ``cpu`` and ``triton`` backends are ``torch.library.custom_op``s with fake implementations and
a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmodels._autocast import autocast_dtype, autocast_off, cast_to
from fastmodels._determinism import alert_not_deterministic
from fastmodels._dispatch import constant_under_compile, cpp_symbol_check, register_op, select_backend
from fastmodels._validation import FLOAT_DTYPES, check_bool, check_tensor
from fastmodels.ops.pushdown import (
    _causal_mask,
    _compute_dtype,
    _depth_index,
    _int32_tape,
    _ptr,
    _rows_in_place,
    _threads,
    _triton_tape,
    unpack_tape,
)

__all__ = ["attachment_scores", "attachment_scores_reference"]

OP = "attachment_scores"


register_op(OP, ("reference", "cpu", "triton"), cpu=("cpu", "reference"), cuda=("triton", "reference"), check=cpp_symbol_check("attachment_fwd", "attachment"))


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def attachment_scores_reference(q, keys, depth_feat, dense, *, binary: bool = False) -> torch.Tensor:
    """The factored form materialized: relu(keys[j] + depth_feat[idx(t, j)]) as [B, Tq, Tk, W].

    ``dense``: [B, Tq, Tk] integer tape. Computes in float32 (float64 for float64 inputs)."""
    cd = _compute_dtype(q.dtype)
    qf, kf, ff = q.to(cd), keys.to(cd), depth_feat.to(cd)
    Tq, Tk = q.shape[1], keys.shape[1]
    idx = _depth_index(dense, depth_feat.shape[0], binary)  # [B, Tq, Tk]
    pre = kf[:, None, :, :] + ff[idx]  # [B, Tq, Tk, W]
    scores = torch.einsum("btw,btjw->btj", qf, torch.relu(pre))
    return scores.masked_fill(~_causal_mask(Tq, Tk, q.device), float("-inf"))


# ---------------------------------------------------------------------------------------------
# cpu and triton backends
# ---------------------------------------------------------------------------------------------


def _backend_tape(backend: str, depth, boundary, dense):
    """The tape as the backend reads it: the Triton kernels take int8/int16/int32 dense tiles as
    they are (pushdown's ``_triton_tape``), the C++ kernel contiguous int32 (saturating)."""
    if backend == "triton":
        return _triton_tape(depth, boundary, dense)
    return tuple(None if x is None else _int32_tape(x).contiguous() for x in (depth, boundary, dense))


@autocast_off
def _fwd_impl(q, keys, feat, depth, boundary, dense, binary: bool, backend: str) -> torch.Tensor:
    B, Tq, W = q.shape
    Tk, V = keys.shape[1], feat.shape[0]
    depth, boundary, dense = _backend_tape(backend, depth, boundary, dense)
    if backend == "triton":
        from fastmodels.kernels.attachment import attachment_fwd

        return attachment_fwd(q.contiguous(), keys.contiguous(), feat.contiguous(), depth, boundary, dense, binary)
    import fastmodels._C as C

    cd = _compute_dtype(q.dtype)
    qf, ff = (x.to(cd).contiguous() for x in (q, feat))
    kf = _rows_in_place(keys, cd)
    out = torch.empty(B, Tq, Tk, dtype=cd, device=q.device)
    C.attachment_fwd(
        qf.data_ptr(), kf.data_ptr(), kf.stride(0), ff.data_ptr(), _ptr(depth), _ptr(boundary), _ptr(dense), out.data_ptr(),
        B, Tq, Tk, W, V, binary, cd == torch.float64, _threads(),
    )
    return out


@autocast_off
def _bwd_impl(grad, q, keys, feat, depth, boundary, dense, binary: bool, backend: str):
    """(dq, dkeys, dfeat) in float32 (float64 for float64 inputs); the gradient of a masked
    (j > t) score is ignored."""
    B, Tq, W = q.shape
    Tk, V = keys.shape[1], feat.shape[0]
    depth, boundary, dense = _backend_tape(backend, depth, boundary, dense)
    if backend == "triton":
        from fastmodels.kernels.attachment import attachment_bwd

        alert_not_deterministic(
            "attachment_scores: the triton backward's depth-table gradient",
            "use backend='reference' (it materializes [B, Tq, Tk, W]) or 'cpu' (CPU tensors), or "
            "torch.use_deterministic_algorithms(True, warn_only=True) to go on with a warning",
        )

        c = lambda x: x.contiguous()  # noqa: E731
        return attachment_bwd(c(grad), c(q), c(keys), c(feat), depth, boundary, dense, binary)
    import fastmodels._C as C

    cd = _compute_dtype(q.dtype)
    g, qf, kf, ff = (x.to(cd).contiguous() for x in (grad, q, keys, feat))
    dq = torch.empty(B, Tq, W, dtype=cd, device=q.device)
    dkeys = torch.empty(B, Tk, W, dtype=cd, device=q.device)
    dfeat = torch.empty(V, W, dtype=cd, device=q.device)
    C.attachment_bwd(
        g.data_ptr(), qf.data_ptr(), kf.data_ptr(), ff.data_ptr(), _ptr(depth), _ptr(boundary), _ptr(dense),
        dq.data_ptr(), dkeys.data_ptr(), dfeat.data_ptr(), B, Tq, Tk, W, V, binary, cd == torch.float64, _threads(),
    )
    return dq, dkeys, dfeat


@torch.library.custom_op("fastmodels::attachment_scores_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    keys: torch.Tensor,
    feat: torch.Tensor,
    depth: Optional[torch.Tensor],
    boundary: Optional[torch.Tensor],
    dense: Optional[torch.Tensor],
    binary: bool,
    backend: str,
) -> torch.Tensor:
    return _fwd_impl(q, keys, feat, depth, boundary, dense, binary, backend)


@_fwd_op.register_fake
def _fwd_fake(q, keys, feat, depth, boundary, dense, binary, backend):
    return q.new_empty((q.shape[0], q.shape[1], keys.shape[1]), dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("fastmodels::attachment_scores_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    feat: torch.Tensor,
    depth: Optional[torch.Tensor],
    boundary: Optional[torch.Tensor],
    dense: Optional[torch.Tensor],
    binary: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, q, keys, feat, depth, boundary, dense, binary, backend)


@_bwd_op.register_fake
def _bwd_fake(grad, q, keys, feat, depth, boundary, dense, binary, backend):
    cd = _compute_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=cd), keys.new_empty(keys.shape, dtype=cd), feat.new_empty(feat.shape, dtype=cd)


def _saved_backward(ctx, grad, bwd):
    q, keys, feat, depth, boundary, dense = ctx.saved_tensors
    dq, dk, df = bwd(grad, q, keys, feat, depth, boundary, dense, ctx.binary, ctx.backend)
    return dq.to(q.dtype), dk.to(keys.dtype), df.to(feat.dtype), None, None, None, None, None


def _setup_context(ctx, inputs, output):
    q, keys, feat, depth, boundary, dense, binary, backend = inputs
    ctx.save_for_backward(q, keys, feat, depth, boundary, dense)
    ctx.binary, ctx.backend = binary, backend


def _backward(ctx, grad):
    return _saved_backward(ctx, grad, _bwd_op)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttachment(torch.autograd.Function):
    """The custom ops' forward and backward for eager calls, without a custom op's dispatch cost
    (~0.1-0.2 ms of host time per call); torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, keys, feat, depth, boundary, dense, binary, backend):
        _setup_context(ctx, (q, keys, feat, depth, boundary, dense, binary, backend), None)
        return _fwd_impl(q, keys, feat, depth, boundary, dense, binary, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _saved_backward(ctx, grad, _bwd_impl)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


@constant_under_compile
def _choose_backend(backend: Optional[str], device_type: str) -> str:
    return select_backend(OP, backend, device_type)


def attachment_scores(q, keys, depth_feat, tape, *, binary: bool = False, backend=None,
                      check_values: bool = True) -> torch.Tensor:
    """score(t, j) = sum_w q[t, w] relu(keys[j, w] + depth_feat[idx(S(t, j)), w]) for j <= t.

    The per-pair MLP of the Pushdown LM's attachment head, factored (see the module docstring and
    ``fastmodels.pushdown.AttachmentHead``), without a [B, Tq, Tk, W] tensor.

    Args:
        q: [B, Tq, W] queries (the head's query times the MLP's second layer).
        keys: [B, Tk, W] key features (the MLP's first layer applied to the keys, its bias
            included); Tq <= Tk, queries are the last Tq positions (as with a KV cache).
        depth_feat: [V, W] depth features (the first layer applied to the depth embeddings).
            Depths are clamped to V - 1. q, keys and depth_feat share one floating dtype.
        tape: a ``fastmodels.pushdown.StackTape`` (batch size B, length Tk) or a dense integer
            tensor [B, Tq, Tk] with S(t, j) >= 0.
        binary: index depth_feat by [S > 0] (the Dyck 0/1 tape) instead of min(S, V - 1).
        backend: None (automatic), "reference", "cpu" or "triton".
        check_values: check that a dense tape has no negative depth (one host sync; skipped under
            torch.compile). With False, negative depths read as 0 on every backend.

    Under ``torch.autocast``, q, keys and depth_feat are first cast to autocast's dtype (float64
    stays), as for ``pushdown_attention``; the scores are float32 either way.

    Returns: [B, Tq, Tk] scores in float32 (float64 for float64 inputs), -inf where j > t.
    Differentiable in q, keys and depth_feat.
    """
    low = autocast_dtype(q)
    if low is not None:
        with torch.autocast(q.device.type, enabled=False):
            return attachment_scores(cast_to(q, low), cast_to(keys, low), cast_to(depth_feat, low), tape, binary=binary,
                                     backend=backend, check_values=check_values)
    dims: dict = {}
    check_tensor(q, "q", shape=("B", "Tq", "W"), dims=dims, dtypes=FLOAT_DTYPES)
    check_tensor(keys, "keys", shape=("B", "Tk", "W"), dims=dims, dtypes=(q.dtype,), device=q.device, dtype_of="q", device_of="q")
    check_tensor(depth_feat, "depth_feat", shape=("V", "W"), dims=dims, dtypes=(q.dtype,), device=q.device, dtype_of="q", device_of="q")
    B, Tq, W = q.shape
    Tk, V = keys.shape[1], depth_feat.shape[0]
    if Tq > Tk:
        raise ValueError(f"q: expected at most as many queries as keys (Tq <= Tk), got Tq={Tq}, Tk={Tk}")
    if V < 1 or (binary and V < 2):
        raise ValueError(f"depth_feat: expected at least {2 if binary else 1} rows (V), got {V}")
    check_bool(binary, "binary")
    check_bool(check_values, "check_values")

    depth, boundary, dense = unpack_tape(tape, B, Tq, Tk, q.device, check_values, keys_name="keys")

    cd = _compute_dtype(q.dtype)
    if B * Tq * Tk == 0 or W == 0:
        # no pair, or an empty sum: 0 below the diagonal, -inf above (gradients are zeros)
        zero = 0 * (q.sum() + keys.sum() + depth_feat.sum()).to(cd)
        return torch.zeros(B, Tq, Tk, dtype=cd, device=q.device).masked_fill(~_causal_mask(Tq, Tk, q.device), float("-inf")) + zero

    chosen = _choose_backend(backend, q.device.type)
    if chosen == "reference":
        if dense is None:
            from fastmodels.pushdown.tape import dense_from_compact

            dense = dense_from_compact(depth, boundary, Tq)
        return attachment_scores_reference(q, keys, depth_feat, dense, binary=binary)
    if chosen == "triton" and q.dtype == torch.float64:
        raise TypeError("q: the triton backend does not support float64 (use backend='reference' or 'cpu')")
    if torch.compiler.is_compiling():
        return _fwd_op(q, keys, depth_feat, depth, boundary, dense, binary, chosen)
    if not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or depth_feat.requires_grad)):
        return _fwd_impl(q, keys, depth_feat, depth, boundary, dense, binary, chosen)  # inference: no autograd node
    return _EagerAttachment.apply(q, keys, depth_feat, depth, boundary, dense, binary, chosen)
