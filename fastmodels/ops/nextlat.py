"""Fused linear + cross-entropy + KL loss (the NextLat objective's logit-sized part).

``linear_cross_entropy_kl`` computes, for an LM head ``W`` (and optional bias ``b``; shown for
``reduction="mean"``, see the function for ``"sum"`` and ``"none"``),

* ``ce`` -- the mean cross-entropy of ``softmax(W h_s + b)`` against ``targets[s]`` over the rows
  whose target is not ``ignore_index`` (0, with zero gradients, if every row is ignored), and
* ``kl`` -- the weighted mean ``sum_m w_m KL(p_{t(m)} || q_m) / sum_m w_m`` of forward KLs from the
  teacher ``p_{t(m)} = softmax(W h_{teacher_index[m]} + b)`` to the student
  ``q_m = softmax(W pred_hidden[m] + b)`` (0 if there is no predicted row or every weight is 0),

without ever holding all ``N x V`` logits. Gradients follow the NextLat paper: hidden, weight and
bias receive the CE gradient only; pred_hidden receives the KL gradient only (the head is frozen
inside the KL and the teacher is not differentiated). Logits and softmaxes are computed in fp32
for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs; ``ce`` and ``kl`` come back in that dtype.

Backends:

* ``reference`` -- full logits, plain autograd: the test oracle.
* ``cpu``       -- token-chunked PyTorch (Liger-Kernel style): the forward walks the rows in chunks
  whose ``[C, V]`` workspace is bounded, computes the loss and the gradients at once, and the
  backward only scales them by the upstream gradients (with ``reduction="none"`` the forward
  computes the row losses only and the backward walks the chunks again with the per-row upstream
  gradients). Each chunk's teacher softmax is reused for every predicted row that points into it
  (predicted rows are grouped by teacher).
* ``triton``    -- ``fastmodels.kernels.nextlat``: per-row LSE blockwise in the forward, logit tiles
  recomputed in the backward, optional deterministic reductions.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastmodels._autocast import autocast_dtype, autocast_off, cast_to
from fastmodels._determinism import deterministic_default
from fastmodels._dispatch import constant_under_compile, register_op, select_backend
from fastmodels._validation import check_bool, check_int, check_same_device, check_tensor

OP = "linear_cross_entropy_kl"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
# Bytes of one [C, V] fp32 logit workspace of the cpu backend; a few of them are alive at once.
_CPU_WORKSPACE_BYTES = 32 << 20


# The chunked "cpu" backend is pure PyTorch: it needs no C++ extension.
register_op(OP, ("reference", "triton", "cpu"), cpu=("cpu", "reference"), cuda=("triton", "reference"), cpu_extension=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 (with zero gradients) where den == 0."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return num / safe


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy_kl_reference(hidden, weight, targets, pred_hidden, teacher_index, bias, kl_weight, ignore_index, reduction="mean"):
    """The objective as written, with full ``[N, V]`` and ``[M, V]`` logits (fp32, or fp64)."""
    cd = _compute_dtype(hidden.dtype)
    W = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    z = hidden.to(cd) @ W.T
    if b is not None:
        z = z + b
    ce_rows = torch.nn.functional.cross_entropy(z, targets.long(), ignore_index=ignore_index, reduction="none")
    logp = torch.log_softmax(z.detach()[teacher_index.long()], dim=-1)
    zs = pred_hidden.to(cd) @ W.detach().T
    if b is not None:
        zs = zs + b.detach()
    logq = torch.log_softmax(zs, dim=-1)
    kl_rows = (logp.exp() * (logp - logq)).sum(-1)
    return _reduce(ce_rows, kl_rows, targets != ignore_index, kl_weight.to(cd), reduction)


def _reduce(ce_rows, kl_rows, valid, w, reduction):
    """(ce, kl) from per-row losses (differentiable): see ``linear_cross_entropy_kl``'s reduction."""
    ce_rows = ce_rows * valid  # 0 on ignored rows, whatever a backend left there
    kl_rows = w * kl_rows
    if reduction == "none":
        return ce_rows, kl_rows
    if reduction == "sum":
        return ce_rows.sum(), kl_rows.sum()
    return _ratio(ce_rows.sum(), valid.sum().to(ce_rows.dtype)), _ratio(kl_rows.sum(), w.sum())


# ---------------------------------------------------------------------------------------------
# cpu: token-chunked, gradients computed in the forward
# ---------------------------------------------------------------------------------------------


def _chunk_rows(V: int) -> int:
    return max(1, _CPU_WORKSPACE_BYTES // (4 * max(V, 1)))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) as a batched dot product (one pass, no [C, V] temporary)."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


@autocast_off
def _lce_kl_chunked_impl(hidden, weight, bias, targets, pred, teacher_index, ignore_index, ce_row_scale, kl_row_scale, grad_hidden, grad_weight, grad_pred, chunk=None):
    """Per-row losses ``(ce_rows [N], kl_rows [M])`` and the gradients of
    ``L = sum_s ce_row_scale[s] ce_s + sum_m kl_row_scale[m] KL_m`` for the requested inputs.

    ``ce_rows`` is 0 on ignored rows, ``kl_rows`` is unweighted; the scales must be 0 on ignored
    rows (they are dL/d(row loss), so any reduction, or an upstream gradient per row, fits).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    M = pred.shape[0]
    cd = _compute_dtype(hidden.dtype)
    C = chunk or _chunk_rows(V)
    W = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    valid = targets != ignore_index

    # Every row of dh, dp and the row losses is written by exactly one chunk; dw and db accumulate.
    dev = hidden.device
    dh = torch.empty(N, D, dtype=cd, device=dev) if grad_hidden else None
    dw = torch.zeros(V, D, dtype=cd, device=dev) if grad_weight else None
    db = torch.zeros(V, dtype=cd, device=dev) if (grad_weight and b is not None) else None
    dp = torch.empty(M, D, dtype=cd, device=dev) if grad_pred else None
    ce_rows = torch.empty(N, dtype=cd, device=dev)
    kl_rows = torch.empty(M, dtype=cd, device=dev)

    # Predicted rows grouped by teacher, so each chunk's teacher softmax serves all its KL rows.
    order = torch.argsort(teacher_index, stable=True)
    t_sorted = teacher_index[order]
    bounds = torch.searchsorted(t_sorted, torch.arange(0, N + C, C, dtype=t_sorted.dtype, device=dev)).tolist()
    for k, a in enumerate(range(0, N, C)):
        e = min(a + C, N)
        n = e - a
        lo, hi = bounds[k], bounds[k + 1]
        # The chunk's true rows and its first (up to C) predicted rows share one logit matmul, one
        # log-softmax and one gradient matmul: [h_a..h_e ; pred rows taught by them].
        first = order[lo : min(lo + C, hi)]
        h = hidden[a:e].to(cd)
        x = torch.cat([h, pred[first].to(cd)]) if first.numel() else h
        logits = torch.addmm(b, x, W.T) if b is not None else x @ W.T
        logs = torch.log_softmax(logits, dim=-1)
        del logits
        logp = logs[:n]
        y = targets[a:e].long()
        v = valid[a:e]
        y_safe = torch.where(v, y, torch.zeros_like(y))
        ce_rows[a:e] = torch.where(v, -logp.gather(1, y_safe[:, None])[:, 0], 0.0)
        need_ce = grad_hidden or grad_weight
        for c in range(lo, hi, C):
            idx = order[c : min(c + C, hi)]
            t = teacher_index[idx] - a
            if c == lo:
                logq = logs[n:]
            else:
                hp = pred[idx].to(cd)
                logq = torch.addmm(b, hp, W.T) if b is not None else hp @ W.T
                logq = torch.log_softmax(logq, dim=-1)
            pt = logp.index_select(0, t).exp_()
            # sum_v p (log p - log q) with the difference taken per element: the two O(log V) sums
            # sum p log p and sum p log q cancel to the small KL (100x the error at V = 32000)
            diff = logp.index_select(0, t).sub_(logq)
            kl_rows[idx] = _rowdot(pt, diff)
            del diff
            if grad_pred:
                logq.exp_().sub_(pt)  # q - p, in place
                if c != lo:
                    dp[idx] = (logq @ W).mul_(kl_row_scale[idx][:, None])
            del logq, pt

        p = logp.exp_()  # the softmax replaces the log-softmax in the stacked buffer (one gradient matmul below)
        s = ce_row_scale[a:e] if need_ce else None
        if need_ce:
            p[torch.arange(n, device=dev), y_safe] -= 1.0  # p - onehot(y); ignored rows carry s = 0
        kl_first = grad_pred and first.numel() > 0
        if grad_hidden or kl_first:
            rows = logs if (grad_hidden and kl_first) else (p if grad_hidden else logs[n:])
            r = rows @ W
            if grad_hidden:
                dh[a:e] = r[:n].mul_(s[:, None])
            if kl_first:
                dp[first] = r[-first.numel():].mul_(kl_row_scale[first][:, None])
        if grad_weight:
            dw.addmm_(p.T, h * s[:, None])
            if db is not None:
                db += s @ p
        del logs, logp, p

    empty = lambda t: t.new_empty(0)  # noqa: E731
    return (
        ce_rows,
        kl_rows,
        dh.to(hidden.dtype) if dh is not None else empty(hidden),
        dw.to(weight.dtype) if dw is not None else empty(weight),
        db.to(bias.dtype) if db is not None else empty(weight),
        dp.to(pred.dtype) if dp is not None else empty(pred),
    )


def _reduction_scales(targets, kl_weight, ignore_index, reduction, cd):
    """(ce_row_scale [N], kl_row_scale [M], ce_norm, kl_norm) of a "mean" or "sum" reduction:
    the loss is ``sum(ce_rows) / ce_norm`` and ``sum(w kl_rows) / kl_norm`` (norm 0 means loss 0)."""
    ce_scale = (targets != ignore_index).to(cd)
    w = kl_weight.to(cd)
    if reduction == "sum":
        return ce_scale, w, 1.0, 1.0
    count = float(ce_scale.sum())
    wsum = float(w.sum()) if w.numel() else 0.0
    return ce_scale / max(count, 1.0), (w / wsum if wsum > 0 else torch.zeros_like(w)), max(count, 1.0), wsum


@torch.library.custom_op("fastmodels::lce_kl_chunked", mutates_args=(), device_types="cpu")
def _lce_kl_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    pred: torch.Tensor,
    teacher_index: torch.Tensor,
    kl_weight: torch.Tensor,
    ignore_index: int,
    reduction: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_pred: bool,
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce, kl) reduced by ``reduction`` ("mean" or "sum") and their gradients, all in one pass."""
    if check_values:  # the caller skipped them (torch.compile); an index out of range would go unnoticed
        _check_values(targets, teacher_index, kl_weight, hidden.shape[0], weight.shape[0], ignore_index)
    cd = _compute_dtype(hidden.dtype)
    ce_scale, kl_scale, ce_norm, kl_norm = _reduction_scales(targets, kl_weight, ignore_index, reduction, cd)
    with torch.no_grad():
        ce_rows, kl_rows, *grads = _lce_kl_chunked_impl(hidden, weight, bias, targets, pred, teacher_index, ignore_index,
                                                        ce_scale, kl_scale, grad_hidden, grad_weight, grad_pred)
        ce = ce_rows.sum() / ce_norm
        kl = (kl_weight.to(cd) * kl_rows).sum() / kl_norm if kl_norm > 0 else torch.zeros((), dtype=cd, device=kl_rows.device)
    return (ce, kl, *grads)


@_lce_kl_chunked.register_fake
def _(hidden, weight, bias, targets, pred, teacher_index, kl_weight, ignore_index, reduction, grad_hidden, grad_weight, grad_pred, check_values):
    scalar = hidden.new_empty((), dtype=_compute_dtype(hidden.dtype))
    return (scalar, scalar.clone(), *_fake_grads(hidden, weight, bias, pred, grad_hidden, grad_weight, grad_pred))


def _fake_grads(hidden, weight, bias, pred, grad_hidden, grad_weight, grad_pred):
    """The gradients the chunked ops return: like their input where requested, else empty."""
    return (
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else weight.new_empty(0),
        torch.empty_like(bias) if (grad_weight and bias is not None) else weight.new_empty(0),
        torch.empty_like(pred) if grad_pred else pred.new_empty(0),
    )


def _chunked_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.flags = inputs[9:12]
    # output[0] (a scalar) anchors the double-backward guard of _chunked_backward to the inputs
    ctx.save_for_backward(output[0], *output[2:])


def _scale(grad, unit):
    return unit * grad.to(unit.dtype)


def _double_backward_error(backend: str) -> RuntimeError:
    return RuntimeError(f"{OP}: the {backend} backend's gradients cannot be differentiated again (double backward); "
                        "use backend='reference' for second derivatives")


def _refuse_double_backward(backend: str):
    """Autograd formula of a backward op: differentiating the gradients it returned raises."""

    def backward(ctx, *_):
        raise _double_backward_error(backend)

    return backward


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the cpu backend's saved unit gradients through under ``create_graph=True``, tied (via
    ``anchor``, an output of the fused op) to the op's inputs, so that differentiating them again
    raises here. ``once_differentiable`` alone does not cover a constant upstream gradient (``ce``
    itself, not ``ce**2``): it then returns the saved gradients as constants, detached from the
    inputs, and a gradient penalty on them would silently get no second derivative."""

    @staticmethod
    def forward(ctx, anchor, *units):
        return tuple(u.view_as(u) for u in units)

    @staticmethod
    def backward(ctx, *_):
        raise _double_backward_error("cpu")


def _chunked_backward(ctx, g_ce, g_kl, *_):
    anchor, *units = ctx.saved_tensors  # the gradients of ce (hidden, weight, bias) and kl (pred) per unit upstream
    grad_hidden, grad_weight, grad_pred = ctx.flags
    wanted = [grad_hidden, grad_weight, grad_weight and ctx.has_bias, grad_pred]
    if torch.is_grad_enabled() and anchor.requires_grad:  # create_graph=True: guard the units' own graph
        given = [i for i, w in enumerate(wanted) if w]
        for i, u in zip(given, _NoDoubleBackward.apply(anchor, *(units[i] for i in given))):
            units[i] = u
    # the products track the upstream gradients (a second derivative through them is exact)
    out_h, out_w, out_b, out_p = (_scale(g, u) if w else None for g, u, w in zip((g_ce, g_ce, g_ce, g_kl), units, wanted))
    return out_h, out_w, out_b, None, out_p, None, None, None, None, None, None, None, None


_lce_kl_chunked.register_autograd(_chunked_backward, setup_context=_chunked_setup)


# reduction="none" on the cpu backend: the gradient of weight and bias mixes every row's upstream
# factor, which exists only in the backward, so the forward computes the row losses alone and the
# backward runs the chunked pass again with the upstream gradients as the row scales.


@torch.library.custom_op("fastmodels::lce_kl_chunked_rows", mutates_args=(), device_types="cpu")
def _lce_kl_chunked_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    pred: torch.Tensor,
    teacher_index: torch.Tensor,
    kl_weight: torch.Tensor,
    ignore_index: int,
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce_rows [N], 0 on ignored rows; kl_rows [M], unweighted), in the compute dtype.
    ``kl_weight`` is only checked here (under torch.compile); the caller applies it."""
    if check_values:
        _check_values(targets, teacher_index, kl_weight, hidden.shape[0], weight.shape[0], ignore_index)
    cd = _compute_dtype(hidden.dtype)
    with torch.no_grad():
        ce_rows, kl_rows, *_ = _lce_kl_chunked_impl(hidden, weight, bias, targets, pred, teacher_index, ignore_index,
                                                    None, None, False, False, False)
    return ce_rows.to(cd), kl_rows.to(cd)


@_lce_kl_chunked_rows.register_fake
def _(hidden, weight, bias, targets, pred, teacher_index, kl_weight, ignore_index, check_values):
    cd = _compute_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=cd), hidden.new_empty(pred.shape[0], dtype=cd)


@torch.library.custom_op("fastmodels::lce_kl_chunked_rows_backward", mutates_args=(), device_types="cpu")
def _lce_kl_chunked_rows_backward(
    grad_ce_rows: torch.Tensor,
    grad_kl_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    pred: torch.Tensor,
    teacher_index: torch.Tensor,
    ignore_index: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_pred: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias, dpred), each an empty tensor where not requested. ``grad_ce_rows``
    must be 0 on ignored rows (``_reduce`` masks them before they reach this op)."""
    cd = _compute_dtype(hidden.dtype)
    with torch.no_grad():
        _, _, *grads = _lce_kl_chunked_impl(hidden, weight, bias, targets, pred, teacher_index, ignore_index,
                                            grad_ce_rows.to(cd), grad_kl_rows.to(cd), grad_hidden, grad_weight, grad_pred)
    return tuple(grads)


@_lce_kl_chunked_rows_backward.register_fake
def _(grad_ce_rows, grad_kl_rows, hidden, weight, bias, targets, pred, teacher_index, ignore_index, grad_hidden, grad_weight, grad_pred):
    return _fake_grads(hidden, weight, bias, pred, grad_hidden, grad_weight, grad_pred)


def _chunked_rows_setup(ctx, inputs, output):
    hidden, weight, bias, targets, pred, teacher_index, _, ignore_index, _ = inputs
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias if bias is not None else weight.new_empty(0), targets, pred, teacher_index)


def _chunked_rows_backward(ctx, g_ce_rows, g_kl_rows):
    hidden, weight, bias, targets, pred, teacher_index = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_hidden, grad_weight, grad_pred = need[0], need[1] or (ctx.has_bias and need[2]), need[4]
    if not (grad_hidden or grad_weight or grad_pred):
        return (None,) * 9
    g_ce_rows = g_ce_rows if g_ce_rows is not None else hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    g_kl_rows = g_kl_rows if g_kl_rows is not None else hidden.new_zeros(pred.shape[0], dtype=torch.float32)
    dh, dw, db, dp = _lce_kl_chunked_rows_backward(
        g_ce_rows, g_kl_rows, hidden, weight, bias if ctx.has_bias else None, targets, pred, teacher_index,
        ctx.ignore_index, grad_hidden, grad_weight, grad_pred,
    )
    return (dh if grad_hidden else None, dw if need[1] else None, db if (ctx.has_bias and need[2]) else None,
            None, dp if grad_pred else None, None, None, None, None)


_lce_kl_chunked_rows.register_autograd(_chunked_rows_backward, setup_context=_chunked_rows_setup)
_lce_kl_chunked_rows_backward.register_autograd(_refuse_double_backward("cpu"))


# ---------------------------------------------------------------------------------------------
# triton: per-row losses from the kernels; the reductions stay in differentiable PyTorch
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastmodels::lce_kl_rows", mutates_args=())
def _lce_kl_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    pred: torch.Tensor,
    teacher_index: torch.Tensor,
    kl_weight: torch.Tensor,
    ignore_index: int,
    deterministic: bool,
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_rows [N], lse [N], kl_rows [M], lse_pred [M]), fp32. ``deterministic`` is for the backward;
    ``kl_weight`` is only checked here (the caller applies it)."""
    from fastmodels.kernels.nextlat import lce_kl_fwd

    if check_values:  # the caller skipped them (torch.compile); the kernels would read out of bounds
        _check_values(targets, teacher_index, kl_weight, hidden.shape[0], weight.shape[0], ignore_index)

    return lce_kl_fwd(hidden, weight, bias, targets, pred, teacher_index, ignore_index)


@_lce_kl_rows.register_fake
def _(hidden, weight, bias, targets, pred, teacher_index, kl_weight, ignore_index, deterministic, check_values):
    N, M = hidden.shape[0], pred.shape[0]
    f = torch.float32
    return hidden.new_empty(N, dtype=f), hidden.new_empty(N, dtype=f), hidden.new_empty(M, dtype=f), hidden.new_empty(M, dtype=f)


@torch.library.custom_op("fastmodels::lce_kl_rows_backward", mutates_args=())
def _lce_kl_rows_backward(
    grad_ce_rows: torch.Tensor,
    grad_kl_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    pred: torch.Tensor,
    teacher_index: torch.Tensor,
    lse: torch.Tensor,
    lse_pred: torch.Tensor,
    ignore_index: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias or an empty tensor, dpred)."""
    from fastmodels.kernels.nextlat import lce_kl_bwd

    dh, dw, db, dp = lce_kl_bwd(
        grad_ce_rows.contiguous(), grad_kl_rows.contiguous(), hidden, weight, bias, targets, pred, teacher_index,
        lse, lse_pred, ignore_index, deterministic,
    )
    return dh, dw, (weight.new_empty(0) if db is None else db), dp


@_lce_kl_rows_backward.register_fake
def _(grad_ce_rows, grad_kl_rows, hidden, weight, bias, targets, pred, teacher_index, lse, lse_pred, ignore_index, deterministic):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db, torch.empty_like(pred)


def _rows_setup(ctx, inputs, output):
    hidden, weight, bias, targets, pred, teacher_index, _, ignore_index, deterministic, _ = inputs
    _, lse, _, lse_pred = output
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None
    ctx.deterministic = deterministic
    ctx.save_for_backward(hidden, weight, bias if bias is not None else weight.new_empty(0), targets, pred, teacher_index, lse, lse_pred)


def _rows_backward(ctx, g_ce_rows, g_lse, g_kl_rows, g_lse_pred):
    hidden, weight, bias, targets, pred, teacher_index, lse, lse_pred = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    g_ce_rows = g_ce_rows if g_ce_rows is not None else lse.new_zeros(lse.shape)
    g_kl_rows = g_kl_rows if g_kl_rows is not None else lse_pred.new_zeros(lse_pred.shape)
    dh, dw, db, dp = _lce_kl_rows_backward(
        g_ce_rows.float(), g_kl_rows.float(), hidden, weight, bias, targets, pred, teacher_index, lse, lse_pred,
        ctx.ignore_index, ctx.deterministic,
    )
    return dh, dw, (db if ctx.has_bias else None), None, dp, None, None, None, None, None


_lce_kl_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
_lce_kl_rows_backward.register_autograd(_refuse_double_backward("triton"))


def _triton_losses(hidden, weight, bias, targets, pred, teacher_index, kl_weight, ignore_index, reduction, deterministic, check_values):
    if hidden.dtype == torch.float64:
        raise TypeError("hidden: the triton backend takes float32, float16 or bfloat16 inputs, got float64 (use backend='cpu' or 'reference')")
    N = hidden.shape[0]
    if N == 0:  # no rows, so no predicted rows either (teacher_index points into hidden)
        # zeros tied to every differentiable input, so each gets a (zero) gradient as elsewhere
        zero = 0 * hidden.sum(-1, dtype=torch.float32) + 0 * weight.sum(dtype=torch.float32)
        if bias is not None:
            zero = zero + 0 * bias.sum(dtype=torch.float32)
        kl = 0 * pred.sum(-1, dtype=torch.float32)
        return (zero, kl) if reduction == "none" else (zero.sum(), kl.sum())
    ce_rows, _, kl_rows, _ = _lce_kl_rows(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), targets.long().contiguous(),
        pred.contiguous(), teacher_index.long().contiguous(), kl_weight.contiguous(), ignore_index, deterministic, check_values,
    )
    return _reduce(ce_rows, kl_rows, (targets != ignore_index).to(torch.float32), kl_weight.to(torch.float32), reduction)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


@constant_under_compile
def _resolve_backend(backend: str | None, device_type: str) -> str:
    # Evaluated once at trace time under torch.compile (the dispatcher imports modules and reads
    # the environment, which dynamo cannot trace).
    return select_backend(OP, backend, device_type)


# ---------------------------------------------------------------------------------------------


def _check_values(targets, teacher_index, kl_weight, N, V, ignore_index):
    """Targets, teacher indices and KL weights in range: one host sync when all is well."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    flags = [bad.any()]
    if teacher_index is not None and teacher_index.numel():
        flags.append(((teacher_index < 0) | (teacher_index >= N)).any())
    if kl_weight is not None and kl_weight.numel():
        flags.append((~torch.isfinite(kl_weight) | (kl_weight < 0)).any())
    if not bool(torch.stack(flags).any()):
        return
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets: expected values in [0, {V}) or ignore_index={ignore_index}, got {int(targets[first])} at row {first}")
    if teacher_index is not None and teacher_index.numel():
        lo, hi = int(teacher_index.min()), int(teacher_index.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"teacher_index: expected values in [0, {N}) (rows of hidden), got range [{lo}, {hi}]")
    if kl_weight is not None and kl_weight.numel():
        if not bool(torch.isfinite(kl_weight).all()) or bool((kl_weight < 0).any()):
            raise ValueError("kl_weight: expected finite non-negative weights")


def _validate(hidden, weight, targets, pred_hidden, teacher_index, bias, kl_weight, ignore_index):
    dims: dict = {}
    check_tensor(hidden, "hidden", shape=("N", "D"), dims=dims, dtypes=_FLOATS)
    check_tensor(weight, "weight", shape=("V", "D"), dims=dims, dtypes=(hidden.dtype,), dtype_of="hidden")
    if dims["V"] == 0:
        raise ValueError("weight: expected a non-empty vocabulary (V >= 1), got shape [0, D]")
    check_tensor(targets, "targets", shape=("N",), dims=dims, dtypes=_INDEX)
    if bias is not None:
        check_tensor(bias, "bias", shape=("V",), dims=dims, dtypes=(hidden.dtype,), dtype_of="hidden")
    if (pred_hidden is None) != (teacher_index is None):
        raise ValueError("pred_hidden and teacher_index: pass both (KL rows) or neither (cross-entropy only)")
    if pred_hidden is not None:
        check_tensor(pred_hidden, "pred_hidden", shape=("M", "D"), dims=dims, dtypes=(hidden.dtype,), dtype_of="hidden")
        check_tensor(teacher_index, "teacher_index", shape=("M",), dims=dims, dtypes=_INDEX)
    if kl_weight is not None:
        if pred_hidden is None:
            raise ValueError("kl_weight: given without pred_hidden/teacher_index")
        check_tensor(kl_weight, "kl_weight", shape=("M",), dims=dims, dtypes=_FLOATS)
    check_int(ignore_index, "ignore_index", low=-(2**63), high=2**63 - 1)  # compared with int64 targets
    device = check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias, pred_hidden=pred_hidden, teacher_index=teacher_index, kl_weight=kl_weight)
    # Data-dependent checks cost a host sync. While torch.compile traces they are skipped here and
    # run inside the fused custom ops instead (they execute on real tensors in the compiled graph).
    if not torch.compiler.is_compiling():
        _check_values(targets, teacher_index, kl_weight, dims["N"], dims["V"], ignore_index)
    return device, dims["D"]


def linear_cross_entropy_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    pred_hidden: torch.Tensor | None = None,
    teacher_index: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    kl_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(ce, kl)`` of an LM head over true and predicted hidden states, no N x V logits.

    Args:
        hidden: ``[N, D]`` rows that get the cross-entropy (true latents ``h_s``).
        weight: ``[V, D]`` LM head (same dtype as hidden: float32, float16, bfloat16 or float64).
        targets: ``[N]`` int64 (or int32) token ids in ``[0, V)``; ``ignore_index`` rows are skipped.
        pred_hidden: ``[M, D]`` predicted latents (optional; M may be 0).
        teacher_index: ``[M]`` int64 rows of ``hidden`` whose softmax is each predicted row's teacher.
        bias: optional ``[V]`` bias of the head.
        kl_weight: optional ``[M]`` non-negative per-row KL weights (default ones; 0 masks a row).
        ignore_index: target value of rows without cross-entropy.
        reduction: ``"mean"`` (default, as below), ``"sum"`` (``ce`` summed over non-ignored rows,
            ``kl = sum_m w_m KL_m``: the form for gradient accumulation over micro-batches with
            different row counts) or ``"none"`` (``ce`` ``[N]`` per row, 0 on ignored rows, and
            ``kl`` ``[M]`` = ``w_m KL_m`` per row; the cpu backend then recomputes the logits in
            the backward instead of computing the gradients in the forward).
        backend: ``"reference"``, ``"cpu"`` or ``"triton"`` (default: the device's preference).
        deterministic: triton backend only: reductions without atomics (bit-reproducible).
            Default None: ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``(ce, kl)`` (fp32; fp64 for fp64 inputs): 0-dim tensors unless ``reduction="none"``. With
        ``"mean"``, ``ce`` is the mean over non-ignored rows (0 if there are none) and
        ``kl = sum_m w_m KL(teacher_m || student_m) / sum_m w_m`` (0 if M = 0 or all weights are
        0). hidden, weight and bias get the CE gradient only; pred_hidden gets the KL gradient only
        (``w_m W^T (q_m - p_m)``, normalised by ``sum w`` for ``"mean"``).
    """
    low = autocast_dtype(hidden)
    if low is not None:
        # Under autocast the matmul operands take autocast's dtype, as F.linear's would (float64
        # stays); logits and softmaxes are still fp32, and nothing inside the op is autocast again
        # (the cpu backend's fp32 buffers, the reference's fp32 logits).
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_cross_entropy_kl(cast_to(hidden, low), cast_to(weight, low), targets, cast_to(pred_hidden, low), teacher_index,
                                           bias=cast_to(bias, low), kl_weight=kl_weight, ignore_index=ignore_index, reduction=reduction,
                                           backend=backend, deterministic=deterministic)
    device, D = _validate(hidden, weight, targets, pred_hidden, teacher_index, bias, kl_weight, ignore_index)
    if deterministic is not None:
        check_bool(deterministic, "deterministic (a bool, or None for torch's flag)")
    deterministic = deterministic_default(deterministic)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    name = _resolve_backend(backend, device.type)
    if pred_hidden is None:
        pred_hidden = hidden.new_empty(0, D)
        teacher_index = targets.new_empty(0, dtype=torch.int64)
    if kl_weight is None:
        kl_weight = torch.ones(pred_hidden.shape[0], dtype=_compute_dtype(hidden.dtype), device=device)
    kl_weight = kl_weight.detach()  # a weight, not a parameter: no backend differentiates it
    check_values = torch.compiler.is_compiling()  # _validate skipped the value checks: the fused ops run them
    if name == "reference":
        return linear_cross_entropy_kl_reference(hidden, weight, targets, pred_hidden, teacher_index, bias, kl_weight, ignore_index, reduction)
    if name == "triton":
        return _triton_losses(hidden, weight, bias, targets, pred_hidden, teacher_index, kl_weight, ignore_index, reduction, deterministic, check_values)
    args = (
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), targets.long().contiguous(),
        pred_hidden.contiguous(), teacher_index.long().contiguous(),
    )
    if reduction == "none":
        ce_rows, kl_rows = _lce_kl_chunked_rows(*args, kl_weight.contiguous(), ignore_index, check_values)
        return _reduce(ce_rows, kl_rows, targets != ignore_index, kl_weight.to(ce_rows.dtype), "none")
    grad_on = torch.is_grad_enabled()
    grad_hidden = grad_on and hidden.requires_grad
    grad_weight = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    grad_pred = grad_on and pred_hidden.requires_grad
    out = _lce_kl_chunked(*args, kl_weight.contiguous(), ignore_index, reduction, grad_hidden, grad_weight, grad_pred, check_values)
    return out[0], out[1]
