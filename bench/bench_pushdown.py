"""Pushdown attention, forward + backward (all four gradients), against its peers.

CPU (fp32, B=2, H=4, D=64, V=50): ours (the default cpu backend), plain causal attention through
torch's scaled_dot_product_attention (the speed/memory yardstick: no depth term), the simple gather
reference, and the authors' materialized form q . (k + E[S]) (T=256 only: at T=1024 it needs
gigabytes). Issue targets: T=1024 at most 1.5x SDPA's time and 2x its peak memory; T=256 at least
10x less peak memory than the materialized form. Also a small LM's training shape (B=32, H=4,
T=128, D=32: the Dyck reproduction's attention), without a target.

CUDA (bf16, B=4, H=16, T in {512, 1024, 2048, 4096}, D in {64, 128}): ours (Triton), SDPA's flash
backend, FlexAttention with the equivalent score_mod (compiled; the depth-table gradient flows
through the captured QE = q E^T buffer), and the materialized form (T=512 for a time, T=4096 to
record its out-of-memory). Targets: <= 1.3x flash time, >= 5x faster than FlexAttention.
"""

from __future__ import annotations

import copy
import math
import random

import torch
import torch.nn.functional as F

from fastmodels.bench.harness import Case, register_cases, with_env
from fastmodels.ops import pushdown_attention
from fastmodels.ops.pushdown import pushdown_attention_materialized
from fastmodels.pushdown import PushdownAttention, StackTape
from fastmodels.pushdown import _cache as pushdown_cache
from fastmodels.testing import rms_ratio


def _random_tree(rng: random.Random, n: int):
    """A random n-ary tree over n leaves as nested lists (built iteratively: deep trees)."""
    # split [0, n) recursively with an explicit stack; leaves are "w"
    root: list = []
    stack = [(root, n)]
    while stack:
        node, size = stack.pop()
        if size == 1:
            node.append("w")
            continue
        k = rng.randint(2, min(4, size))
        cuts = sorted(rng.sample(range(1, size), k - 1))
        for a, b in zip([0] + cuts, cuts + [size]):
            if b - a == 1:
                node.append("w")
            else:
                child: list = []
                node.append(child)
                stack.append((child, b - a))
    return root


def _setup(B, H, T, D, V, dtype, device, threads=None):
    def make():
        if threads is not None:
            torch.set_num_threads(threads)  # this case's worker process only
        rng = random.Random(0)
        trees = [_random_tree(rng, T) for _ in range(B)]
        tape = StackTape.from_trees(trees, device=device)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True) for _ in range(3))
        E = (0.5 * torch.randn(V, D, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
        do = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
        inputs = {"q": q, "k": k, "v": v, "E": E, "do": do, "tape": tape, "scale": 1 / math.sqrt(D)}
        # references: float64 on CPU, float32 on CUDA (T <= 1024; the gather reference is O(T^2) memory)
        ref_dtype = torch.float64 if device == "cpu" else torch.float32
        leaves = [x.detach().to(ref_dtype).requires_grad_(True) for x in (q, k, v, E)]
        if T <= 1024:
            out = pushdown_attention(*leaves, tape, backend="reference")
            inputs["ref"] = (out.detach(), *torch.autograd.grad(out, leaves, do.to(ref_dtype)))
        else:  # the gather reference is O(T^2) memory: check batch 0, heads 0-3 (not dE, a sum over all)
            sub = [t[:1, :4].detach().requires_grad_(True) for t in leaves[:3]]
            out = pushdown_attention(*sub, leaves[3], StackTape.from_trees(trees[:1], device=device), backend="reference")
            inputs["ref_sub"] = (out.detach(), *torch.autograd.grad(out, sub, do[:1, :4].to(ref_dtype)))
        leaves = [x.detach().to(ref_dtype).requires_grad_(True) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
        inputs["ref_sdpa"] = (out.detach(), *torch.autograd.grad(out, leaves, do.to(ref_dtype)))
        return inputs

    return make


def _grads(out, x, wrt):
    return (out, *torch.autograd.grad(out, [x[n] for n in wrt], x["do"]))


def _ours(x):
    out = pushdown_attention(x["q"], x["k"], x["v"], x["E"], x["tape"])
    return ("pushdown", _grads(out, x, "qkvE"))


# Ours with the dq pass's depth histogram as the per-value loop (FASTMODELS_PUSHDOWN_HIST).
_ours_hist_loop = with_env("FASTMODELS_PUSHDOWN_HIST", "loop", _ours)
# Ours without the row-uniform fast path (FASTMODELS_PUSHDOWN_UNIFORM=0): every tile general.
_ours_no_uniform = with_env("FASTMODELS_PUSHDOWN_UNIFORM", "0", _ours)


def _reference(x):
    out = pushdown_attention(x["q"], x["k"], x["v"], x["E"], x["tape"], backend="reference")
    return ("pushdown", _grads(out, x, "qkvE"))


def _materialized(x):
    out = pushdown_attention_materialized(x["q"], x["k"], x["v"], x["E"], x["tape"].dense(), scale=x["scale"])
    return ("pushdown", _grads(out, x, "qkvE"))


def _sdpa(x):
    out = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    return ("sdpa", _grads(out, x, "qkv"))


def _sdpa_flash(x):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    return ("sdpa", _grads(out, x, "qkv"))


_FLEX: dict = {}


def _flex_pushdown(q, k, v, qe, S, block_mask, scale: float, kernel_options: dict):
    """FlexAttention with score_mod = score + scale * QE[b, h, q, S(q, kv)]. QE = q E^T enters as
    a captured differentiable buffer, so the depth table's gradient comes through Flex's backward."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, qi, ki):
        return score + scale * qe[b, h, qi, S[b, qi, ki]]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def _flex(x):
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, T, D = x["q"].shape
    if _FLEX.get("key") != (B, T, D):
        torch._dynamo.reset()  # one compiled graph per case: no recompile-limit surprises
        _FLEX["fn"] = torch.compile(_flex_pushdown, fullgraph=True)
        _FLEX["mask"] = create_block_mask(lambda b, h, qi, ki: ki <= qi, B, None, T, T, device=x["q"].device)
        _FLEX["S"] = x["tape"].dense().clamp_(max=x["E"].shape[0] - 1).to(torch.int32)
        _FLEX["key"] = (B, T, D)
    qe = torch.einsum("bhtd,vd->bhtv", x["q"], x["E"])
    out = _FLEX["fn"](x["q"], x["k"], x["v"], qe, _FLEX["S"], _FLEX["mask"], x["scale"], _FLEX_OPTIONS)
    return ("pushdown", _grads(out, x, "qkvE"))


# Flex's backward with a captured gradient buffer needs more shared memory than its default tiles
# leave at D = 64/128 ("No valid triton configs" on an H200, torch 2.11): smaller backward tiles,
# the forward's defaults kept (bwd_-prefixed options; these ran on 2026-11-26).
_FLEX_OPTIONS = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_stages": 1}


def _error(x, result):
    """Worst RMS-relative error over (out, dq, dk, dv[, dE]) against the float reference, and each
    component on its own (err_out, err_dq, ...)."""
    kind, got = result
    ref = x.get("ref") if kind == "pushdown" else x["ref_sdpa"]
    if ref is None and kind == "pushdown" and "ref_sub" in x:
        ref, got = x["ref_sub"], [g[:1, :4] for g in got[:4]]
    if ref is None:
        return float("nan")
    names = ("out", "dq", "dk", "dv", "dE")
    errs = {f"err_{n}": rms_ratio(g, r) for n, g, r in zip(names, got, ref)}
    row = {"max_rms_rel_err": max(errs.values()), **errs}
    if kind == "pushdown":  # how much of the tape the Triton kernels' row-uniform fast path covers
        row["row_uniform_tiles_64x64"] = x["tape"].row_uniform_fraction(64, 64)
    return row


def _fwd_bwd_flops(B, H, T, D, V):
    # causal: half of the 2 forward + 5 backward T x T x D GEMMs (recompute included), plus q E^T
    return 0.5 * 7 * 2 * B * H * T * T * D + 4 * B * H * T * V * D


def _decode_setup(B, H, Tk, D, V):
    """One decoding step: a query row against Tk cached keys, with its dense depth row (the last row
    of a random tree's tape, as a beam search would pass), no gradients."""

    def make():
        rng = random.Random(0)
        dense = StackTape.from_trees([_random_tree(rng, Tk) for _ in range(B)]).dense()[:, -1:]
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(B, H, 1, D, generator=g)
        k, v = (torch.randn(B, H, Tk, D, generator=g) for _ in range(2))
        E = 0.5 * torch.randn(V, D, generator=g)
        x = {"q": q, "k": k, "v": v, "E": E, "tape": dense}
        f64 = [t.double() for t in (q, k, v, E)]
        x["ref"] = pushdown_attention(*f64, dense, backend="reference")
        x["ref_sdpa"] = F.scaled_dot_product_attention(*f64[:3])
        return x

    return make


def _decode(blocked: bool):
    """Ours on a decoding step: the default (one fused C++ call for a few query rows) or, with
    ``blocked``, the GEMM-based blocked path that served decoding steps before it."""
    from fastmodels.ops import pushdown as ops_pushdown

    def run(x):
        saved = ops_pushdown._DECODE_ROWS
        ops_pushdown._DECODE_ROWS = 0 if blocked else saved
        try:
            with torch.no_grad():
                return "pushdown", pushdown_attention(x["q"], x["k"], x["v"], x["E"], x["tape"])
        finally:
            ops_pushdown._DECODE_ROWS = saved

    return run


def _decode_reference(x):
    with torch.no_grad():
        return "pushdown", pushdown_attention(x["q"], x["k"], x["v"], x["E"], x["tape"], backend="reference")


def _decode_sdpa(x):
    with torch.no_grad():  # the last position sees every cached key: no mask
        return "sdpa", F.scaled_dot_product_attention(x["q"], x["k"], x["v"])


def _decode_error(x, result):
    kind, out = result
    return rms_ratio(out, x["ref"] if kind == "pushdown" else x["ref_sdpa"])


def _decode_loop_setup(B, d_model, H, T):
    """A whole sentence decoded token by token through ``PushdownAttention`` with a KV cache (each
    step's depth row from a random tree's tape), no gradients; references: the full forward of
    the module in float64, and of plain causal attention with the same projections."""

    def make():
        torch.manual_seed(0)
        m = PushdownAttention(d_model, H).eval()
        rng = random.Random(0)
        dense = StackTape.from_trees([_random_tree(rng, T) for _ in range(B)]).dense()
        x = torch.randn(B, T, d_model)
        m64 = copy.deepcopy(m).double()
        with torch.no_grad():
            ref = m64(x.double(), dense)
            ref_sdpa = _plain_attention(m64, x.double(), None)
        return {"m": m, "x": x, "dense": dense, "ref": ref, "ref_sdpa": ref_sdpa}

    return make


def _plain_attention(m, x, cache):
    """``m``'s projections around plain attention (SDPA, no depth term): causal over x, or one
    decoding step that concatenates to ``cache``."""
    B, T, C = x.shape
    q, k, v = m.qkv(x).view(B, T, 3, m.n_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
    y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
    return m.proj(y.transpose(1, 2).reshape(B, T, C))


def _decode_loop(capacity: bool):
    """Ours: the module's cache appending in place (default) or, without ``capacity``, by
    concatenation, as it did before."""

    def run(x):
        saved = pushdown_cache._CAPACITY_CACHE
        pushdown_cache._CAPACITY_CACHE = capacity
        try:
            cache, steps = {}, []
            with torch.no_grad():
                for t in range(x["x"].shape[1]):
                    steps.append(x["m"](x["x"][:, t : t + 1], x["dense"][:, t : t + 1, : t + 1], cache, check_values=False))
            return "pushdown", torch.cat(steps, dim=1)
        finally:
            pushdown_cache._CAPACITY_CACHE = saved

    return run


def _decode_loop_sdpa(x):
    cache = {}
    with torch.no_grad():
        steps = [_plain_attention(x["m"], x["x"][:, t : t + 1], cache) for t in range(x["x"].shape[1])]
    return "sdpa", torch.cat(steps, dim=1)


@register_cases("pushdown_attention")
def cases(device: str, quick: bool) -> list[Case]:
    out = []
    if device == "cpu":
        V = 50
        # the shapes (B2 H4 D64), then a small LM's training shape (no target): many short
        # sequences, as in the Dyck reproduction (width 128, 4 heads)
        for B, H, T, D, threads in ((2, 4, 256, 64, None), (2, 4, 1024, 64, None), (2, 4, 1024, 64, 1), (32, 4, 128, 32, None)):
            impls = {"fastmodels": _ours, "sdpa_causal": _sdpa, "gather_reference": _reference}
            targets = {}
            if T == 256:
                impls["materialized"] = _materialized
                targets["mem_ratio:materialized"] = 10.0
            elif T == 1024:
                targets["time_ratio:sdpa_causal"] = 1 / 1.5
                targets["mem_ratio:sdpa_causal"] = 1 / 2.0
            tag = "" if threads is None else f" {threads} thread"
            out.append(Case(
                op="pushdown_attention", name=f"fwd+bwd fp32 B{B} H{H} T{T} D{D} V{V}{tag}", device="cpu",
                setup=_setup(B, H, T, D, V, torch.float32, "cpu", threads), impls=impls, error=_error,
                error_name="max_rms_rel_err", flops=lambda x, B=B, H=H, T=T, D=D: _fwd_bwd_flops(B, H, T, D, V),
                targets=targets, quick=T == 256 and threads is None,
                note="error: worst RMS-relative error of out, dq, dk, dv (and dE) vs float64; sdpa_causal is plain causal attention (no depth term), timed as the yardstick",
            ))
        # decoding steps (inference, no target): a small LM's beam of 8 sentences, and one
        # Pushdown-GPT2 sentence (12 heads)
        for B, H, Tk, D in ((8, 4, 65, 64), (1, 12, 256, 64)):
            out.append(Case(
                op="pushdown_attention", name=f"decode step fp32 B{B} H{H} Tk{Tk} D{D} V{V}", device="cpu",
                setup=_decode_setup(B, H, Tk, D, V), error=_decode_error,
                impls={"fastmodels": _decode(False), "fastmodels (blocked)": _decode(True), "sdpa": _decode_sdpa,
                       "gather_reference": _decode_reference},
                note="one query row against Tk cached keys with its dense depth row, no grad; 'blocked': the GEMM-based "
                     "path that decoding steps took before the fused one; sdpa: plain attention of the row (no depth term)",
            ))
        # whole decodes through the module (inference, no target): the KV cache's in-place appends
        # against the concatenation it did before, and plain attention decoding the same way
        for B, d_model, H, T in ((8, 256, 4, 256), (1, 768, 12, 512)):
            out.append(Case(
                op="pushdown_attention", name=f"module decode fp32 B{B} d{d_model} H{H} T{T}", device="cpu",
                setup=_decode_loop_setup(B, d_model, H, T), error=_decode_error,
                impls={"fastmodels": _decode_loop(True), "fastmodels (concat cache)": _decode_loop(False),
                       "sdpa (concat cache)": _decode_loop_sdpa},
                note="PushdownAttention decoding T tokens one at a time with a dict KV cache, no grad; 'concat cache': "
                     "the cache concatenating every step (the behaviour before); sdpa: the same projections around "
                     "plain attention (no depth term), its cache concatenating as Hugging Face's DynamicCache does",
            ))
        return out
    B, H, V = 4, 16, 50
    for T in (512, 1024, 2048, 4096):
        for D in (64, 128):
            impls = {"fastmodels": _ours, "sdpa_flash": _sdpa_flash}
            targets = {"time_ratio:sdpa_flash": 1 / 1.3, "max_rms_rel_err": 2e-2}
            notes = ["bf16 fwd+bwd; error vs a float32 reference (T > 1024: batch 0, heads 0-3, no dE)"]
            if (T, D) in ((1024, 64), (2048, 128)):
                impls["flex_attention"] = _flex
                targets["time_ratio:flex_attention"] = 5.0
                notes.append("FlexAttention (torch.compile, score_mod with captured QE, depth grad included) only at 2 shapes to keep compile time inside the GPU budget")
            if (T, D) in ((1024, 64), (4096, 64)):
                impls["fastmodels (uniform=0)"] = _ours_no_uniform
                notes.append("'uniform=0': without the fast path for row-uniform tiles (every tile through the general path)")
            if (T, D) == (4096, 64):
                impls["fastmodels (hist=loop)"] = _ours_hist_loop
                notes.append("'hist=loop': the dq pass's depth histogram as the per-value loop instead of tensor-core dots")
            if T in (512, 4096):
                impls["materialized"] = _materialized
                notes.append("materialized form only at T=512 (timing) and T=4096 (expected OOM)")
            out.append(Case(
                op="pushdown_attention", name=f"fwd+bwd bf16 B{B} H{H} T{T} D{D} V{V}", device="cuda",
                setup=_setup(B, H, T, D, V, torch.bfloat16, "cuda"), impls=impls, error=_error,
                error_name="max_rms_rel_err", flops=lambda x, T=T, D=D: _fwd_bwd_flops(B, H, T, D, V),
                targets=targets, quick=(T, D) == (512, 64), note="; ".join(notes),
            ))
    # FlexAttention's compile is the slowest step: its cases go last, so a time limit cuts them
    # and not the T=4096 runs
    return sorted(out, key=lambda c: "flex_attention" in c.impls)

