"""Every op inside torch.autocast regions (the policy of fastmodels/_autocast.py).

The attention-like ops run on their inputs cast to autocast's dtype, as scaled_dot_product_attention
does: the result must equal the op on inputs cast by hand, bit for bit, on every backend (before,
the cpu backend of pushdown_attention handed autocast's bf16 GEMM outputs to C++ code that reads
fp32 buffers and corrupted the heap, and the reference computed in bf16 while the fused backends
computed in fp32). The ops that choose their own precision (randomized SVD, electric field) must
not change at all. The fused backends' backward, run inside an autocast region, must give the
gradients of a backward outside it.
"""

import pytest
import torch
from helpers import DEVICE, backend_device, op_backends

from fastmodels.ops import (
    attachment_scores,
    electric_image,
    intruder_dimensions,
    linear_cross_entropy_kl,
    low_rank,
    pushdown_attention,
    randomized_svd,
    singular_value_grads,
)
from fastmodels.pushdown import StackTape

LOW = torch.bfloat16
TREES = ["((a b) ((c d) (e (f g))))", "((a b) (c (d (e f))))"]  # T = 7, padded second sentence


def autocast(device):
    return torch.autocast(torch.device(device).type, dtype=LOW)


def leaves(*shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def pushdown_case(device, decode):
    """(tape, leaf shapes): a training shape with a compact tape, or 2 decoding rows with a dense
    tape (the cpu backend's fused decode path)."""
    if decode:
        tape = torch.randint(0, 4, (2, 2, 7), generator=torch.Generator().manual_seed(1)).to(device)
        shapes = [(2, 3, 2, 16), (2, 3, 7, 16), (2, 3, 7, 16), (5, 16)]
    else:
        tape = StackTape.from_trees(TREES, device=device)
        shapes = [(2, 3, 7, 16), (2, 3, 7, 16), (2, 3, 7, 16), (3, 5, 16)]  # a per-head table
    return tape, shapes


def same(got, want, atomic=False):
    """Bit for bit, except a gradient that a GPU kernel sums with fp32 atomics (the attachment
    kernels' depth-table gradient): its rounding may differ between any two runs."""
    if atomic and got.is_cuda:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    else:
        assert torch.equal(got, want)


def grads_of(out, xs, seed=2):
    """Gradients of a fixed random projection of ``out`` (finite entries only) w.r.t. ``xs``."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device)
    fin = torch.isfinite(out)
    return torch.autograd.grad((out[fin].double() * g[fin]).sum(), xs)


def check_runs_on_autocast_dtype(call, xs, out_dtype, atomic=()):
    """``call(*xs)`` under autocast equals ``call`` on the inputs cast to LOW by hand, and its
    gradients (backward outside the region) reach the fp32 leaves as the hand-cast ones' in fp32.
    ``atomic``: indices of gradients that a GPU kernel sums with atomics."""
    with autocast(xs[0].device):
        out = call(*xs)
    got = grads_of(out, xs)
    low = [x.detach().to(LOW).requires_grad_() for x in xs]
    want_out = call(*low)
    want = grads_of(want_out, low)
    assert out.dtype == out_dtype
    assert torch.equal(out, want_out)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32
        same(g, w.float(), atomic=i in atomic)


@pytest.mark.parametrize("decode", [False, True], ids=["train", "decode"])
@pytest.mark.parametrize("backend", op_backends("pushdown_attention", include_reference=True))
def test_pushdown_attention_runs_on_autocast_dtype(backend, decode):
    dev = backend_device(backend)
    tape, shapes = pushdown_case(dev, decode)
    check_runs_on_autocast_dtype(lambda *xs: pushdown_attention(*xs, tape, backend=backend), leaves(*shapes, device=dev), LOW)


@pytest.mark.parametrize("backend", op_backends("attachment_scores", include_reference=True))
def test_attachment_scores_run_on_autocast_dtype(backend):
    dev = backend_device(backend)
    tape = StackTape.from_trees(TREES, device=dev)
    xs = leaves((2, 7, 24), (2, 7, 24), (5, 24), device=dev)
    # the scores are fp32 for bf16 operands
    check_runs_on_autocast_dtype(lambda *xs: attachment_scores(*xs, tape, backend=backend), xs, torch.float32, atomic=(2,))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64_inputs_stay_float64(backend):
    """autocast leaves float64 alone (as for torch's own ops): the op is unchanged."""
    tape = StackTape.from_trees(TREES)
    xs = leaves((2, 3, 7, 16), (2, 3, 7, 16), (2, 3, 7, 16), (5, 16), device="cpu", dtype=torch.float64)
    want = pushdown_attention(*xs, tape, backend=backend)
    with autocast("cpu"):
        out = pushdown_attention(*xs, tape, backend=backend)
    assert out.dtype == torch.float64 and torch.equal(out, want)


def _pushdown_call(backend, dev):
    tape, shapes = pushdown_case(dev, decode=False)
    return lambda xs: pushdown_attention(*xs, tape, backend=backend), shapes


def _attachment_call(backend, dev):
    tape = StackTape.from_trees(TREES, device=dev)
    return lambda xs: attachment_scores(*xs, tape, backend=backend), [(2, 7, 24), (2, 7, 24), (5, 24)]


def _nextlat_call(backend, dev):  # deterministic: the triton backend's reductions without atomics
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 37, (9,), generator=g).to(dev)
    teacher = torch.randint(0, 9, (4,), generator=g).to(dev)

    def call(xs):  # per-row losses: the cpu backend then recomputes the logits in the backward
        ce, kl = linear_cross_entropy_kl(xs[0], xs[1], targets, xs[2], teacher, reduction="none", backend=backend,
                                         deterministic=backend == "triton")
        return torch.cat([ce, kl])

    return call, [(9, 16), (37, 16), (4, 16)]


@pytest.mark.parametrize("op,backend", [pytest.param(op, b.values[0], marks=b.marks, id=f"{op}-{b.id}")
                                        for op, name in [("pushdown", "pushdown_attention"), ("attachment", "attachment_scores"),
                                                         ("nextlat", "linear_cross_entropy_kl")]
                                        for b in op_backends(name)])
def test_backward_inside_autocast_matches_backward_outside(op, backend):
    """An fp32 forward outside autocast, then ``backward`` inside a region: the autograd engine
    runs custom backwards with the caller's autocast state, which made the cpu backends compute
    part of the gradients in bf16 (pushdown's dq) or fail (nextlat's per-row backward). (The
    reference backends are torch ops, whose backward formulas autocast acts on as on any model's.)"""
    dev = backend_device(backend)
    call, shapes = {"pushdown": _pushdown_call, "attachment": _attachment_call, "nextlat": _nextlat_call}[op](backend, dev)
    xs = leaves(*shapes, device=dev)
    want = grads_of(call(xs), xs)
    out = call(xs)
    with autocast(dev):
        got = grads_of(out, xs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32
        same(g, w, atomic=op == "attachment" and i == 2)


@pytest.mark.parametrize("backend", op_backends("randomized_svd", include_reference=True))
def test_randomized_svd_family_ignores_autocast(backend):
    """The factorization keeps its accuracy contract inside an autocast region: every result is
    the one outside it (autocast made its fp32 GEMMs bf16 before: 1e-3 relative error in S)."""
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(4)
    A = (torch.randn(3, 40, 30, generator=g) * torch.logspace(0, -3, 30)).to(dev)
    W, G = torch.randn(40, 30, generator=g).to(dev), torch.randn(40, 30, generator=g).to(dev)

    def calls():
        svd = randomized_svd(A, 5, seed=1, backend=backend)
        return [*svd, *low_rank(A, [3, 6], seed=1, backend=backend),
                singular_value_grads(svd.U[0], svd.S[0], svd.V[0], G),
                intruder_dimensions(W, W + 0.3 * G, k=5).max_cos]

    want = calls()
    with autocast(dev):
        got = calls()
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("backend", op_backends("electric_image", include_reference=True))
def test_electric_image_ignores_autocast(backend):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    B, N, M, R = 3, 2, 4, 8
    args = [torch.rand(B, N, 2, generator=g) * 10, torch.rand(B, N, generator=g) * 6, torch.ones(B, N),
            torch.rand(B, M, 2, generator=g) * 10, torch.rand(B, M, generator=g) * 0.5 + 0.1,
            torch.rand(B, M, generator=g) - 0.5, torch.ones(B, M, dtype=torch.bool), torch.randn(R, 2, generator=g),
            torch.nn.functional.normalize(torch.randn(R, 2, generator=g), dim=-1)]
    args = [a.to(dev) for a in args]
    arena = torch.full((B, 2), 12.0, device=dev)
    want = electric_image(*args, arena=arena, backend=backend)
    with autocast(dev):
        got = electric_image(*args, arena=arena, backend=backend)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_pushdown_module_under_autocast_is_the_op_on_autocast_operands():
    """PushdownAttention under autocast: bf16 projections (autocast's linear), the op on bf16
    q, k, v and table, every parameter's fp32 gradient, and a token-by-token decode from the
    in-place cache that matches the full forward."""
    from fastmodels import PushdownAttention

    torch.manual_seed(6)
    dev = DEVICE
    m = PushdownAttention(32, 4, max_depth=5, per_head_table=True).to(dev)
    tape = StackTape.from_trees(TREES, device=dev)
    x = torch.randn(2, 7, 32, device=dev, requires_grad=True)
    params = [x, *m.parameters()]
    with autocast(dev):
        out = m(x, tape)
        got = grads_of(out, params)
    assert out.dtype == LOW

    def by_hand():
        c = lambda t: t.to(LOW)  # noqa: E731
        qkv = torch.nn.functional.linear(c(x), c(m.qkv.weight), c(m.qkv.bias))
        q, k, v = qkv.view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        y = pushdown_attention(q, k, v, c(m.depth_emb), tape, backend=m.backend).transpose(1, 2).reshape(2, 7, 32)
        return torch.nn.functional.linear(y, c(m.proj.weight), c(m.proj.bias))

    want_out = by_hand()
    want = grads_of(want_out, params)
    assert torch.equal(out, want_out)
    for g, w, p in zip(got, want, params):
        assert g.dtype == p.dtype and torch.equal(g, w)

    dense = tape.dense()
    cache: dict = {}
    with torch.no_grad(), autocast(dev):
        steps = [m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache) for t in range(7)]
    assert cache["k"].dtype == LOW
    # other GEMM shapes and kernel paths: bf16's relative tolerance, and one part in 100 of the
    # largest output for entries near zero
    full = out.detach()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1.6e-2, atol=1e-2 * float(full.abs().max()))
