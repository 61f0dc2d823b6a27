"""The C++ CPU kernel of attachment_scores (csrc/cpu/attachment.cpp) against the op's reference:
scores and all three gradients on odd shapes, compact and dense tapes (int8/int32/int64, depths
past V - 1), decoding shapes (Tq < Tk), float64 / float32 / float16 / bfloat16 inputs; and the raw
C functions on NaN-filled buffers (every element written, masked gradients never read)."""

import random

import pytest
import torch

from fastmodels.ops import attachment_scores
from fastmodels.pushdown import StackTape

from helpers import op_backend_unavailable_reason, rms_ratio

pytestmark = pytest.mark.skipif(
    bool(op_backend_unavailable_reason("attachment_scores", "cpu", "cpu")),
    reason=str(op_backend_unavailable_reason("attachment_scores", "cpu", "cpu")),
)


def random_bracket_tree(rng: random.Random, n: int) -> str:
    """A random n-ary tree over n leaves as an unlabeled bracket string."""
    if n == 1:
        return "w"
    k = rng.randint(2, min(4, n))
    cuts = sorted(rng.sample(range(1, n), k - 1))
    kids = [random_bracket_tree(rng, b - a) for a, b in zip([0] + cuts, cuts + [n])]
    return "(" + " ".join(kids) + ")"


def random_dyck(rng: random.Random, n: int) -> str:
    s, depth = [], 0
    for k in range(n):
        if depth and (rng.random() < 0.5 or depth >= n - k):
            s.append(")")
            depth -= 1
        else:
            s.append("(")
            depth += 1
    return "".join(s)


def compact_tape(B: int, T: int, seed: int, dyck: bool = False) -> StackTape:
    """A padded batch: the first sentence of length T, the others shorter (random lengths)."""
    rng = random.Random(seed)
    lengths = [T] + [rng.randint(1, T) for _ in range(B - 1)]
    if dyck:
        return StackTape.from_brackets([random_dyck(rng, n) for n in lengths], pad_to=T)
    return StackTape.from_trees([random_bracket_tree(rng, n) for n in lengths], pad_to=T)


def make_inputs(B, Tq, Tk, W, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, W, generator=g, dtype=torch.float64).to(dtype)
    keys = torch.randn(B, Tk, W, generator=g, dtype=torch.float64).to(dtype)
    feat = torch.randn(V, W, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, Tq, Tk, generator=g, dtype=torch.float64)
    return q, keys, feat, grad


def run(backend, q, keys, feat, tape, grad, binary, compute=None):
    """Scores and (dq, dkeys, dfeat) for upstream gradient ``grad``; inputs cast to ``compute``."""
    if compute is not None:
        q, keys, feat = (x.to(compute) for x in (q, keys, feat))
    q, keys, feat = (x.detach().clone().requires_grad_(True) for x in (q, keys, feat))
    out = attachment_scores(q, keys, feat, tape, binary=binary, backend=backend)
    grads = torch.autograd.grad(out, (q, keys, feat), grad.to(out.dtype))
    return (out.detach(), *grads)


def check_against_reference(q, keys, feat, tape, grad, binary):
    """float64: elementwise to ~1e-12; float32 (and the low-precision inputs, whose scores come
    back in float32): RMS-relative error against the float64 reference of the same values."""
    dtype = q.dtype
    got = run("cpu", q, keys, feat, tape, grad, binary)
    want = run("reference", q, keys, feat, tape, grad, binary, compute=torch.float64)
    names = ("scores", "dq", "dkeys", "dfeat")
    Tq, Tk = q.shape[1], keys.shape[1]
    visible = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    assert torch.equal(torch.isinf(got[0]), ~visible.expand_as(got[0])), "-inf exactly above the diagonal"
    assert (got[0][~visible.expand_as(got[0])] == float("-inf")).all()
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, a, b in zip(names, got, want):
        if name != "scores":
            assert a.dtype == dtype, name
        a, b = (x.double() for x in (a, b))
        if name == "scores":
            a, b = a[:, visible], b[:, visible]
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        else:
            # float32 arithmetic; float16 / bfloat16 gradients are rounded once to their dtype
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            if name == "scores":
                tol = 1e-5
            err = rms_ratio(a, b)
            assert err <= tol, f"{name}: RMS-relative error {err:.2e} > {tol:g}"


SHAPES = [  # B, T, W, V
    (1, 1, 1, 2),
    (3, 7, 16, 5),
    (1, 63, 60, 2),
    (3, 63, 1, 50),
    (3, 100, 60, 5),
    (1, 100, 16, 50),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("binary", [False, True], ids=["clamp", "binary"])
@pytest.mark.parametrize("B,T,W,V", SHAPES)
def test_compact_tape(B, T, W, V, binary, dtype):
    tape = compact_tape(B, T, seed=T + W, dyck=binary)
    q, keys, feat, grad = make_inputs(B, T, T, W, V, dtype, seed=B + T + W + V)
    check_against_reference(q, keys, feat, tape, grad, binary)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("V", [1, 2, 5])
def test_one_depth_row(V, dtype):
    """V = 1 (every pair reads row 0) and depths far beyond V - 1."""
    tape = compact_tape(3, 63, seed=4)
    q, keys, feat, grad = make_inputs(3, 63, 63, 16, V, dtype, seed=V)
    check_against_reference(q, keys, feat, tape, grad, False)


@pytest.mark.parametrize("tape_dtype", [torch.int8, torch.int32, torch.int64])
@pytest.mark.parametrize("binary", [False, True], ids=["clamp", "binary"])
@pytest.mark.parametrize("kind", ["random", "trees"])
def test_dense_tape(kind, binary, tape_dtype):
    """Random depths (short runs down each column, values past V - 1) and tree tapes as dense ints."""
    B, T, W, V = 3, 63, 60, 5
    if kind == "random":
        g = torch.Generator().manual_seed(7)
        S = torch.randint(0, 2 * V + 3, (B, T, T), generator=g).to(tape_dtype)
    else:
        S = compact_tape(B, T, seed=8).dense().to(tape_dtype)
    q, keys, feat, grad = make_inputs(B, T, T, W, V, torch.float64, seed=9)
    check_against_reference(q, keys, feat, S, grad, binary)


def test_dense_tape_negative_and_huge_values():
    """Unchecked negative depths read row 0 and int64 depths past 2^31 read row V - 1, as in the reference."""
    B, T, W, V = 2, 30, 16, 5
    g = torch.Generator().manual_seed(10)
    S = torch.randint(-3, 8, (B, T, T), generator=g)
    S[0, :, ::3] = 2**40
    q, keys, feat, grad = make_inputs(B, T, T, W, V, torch.float64, seed=11)
    got = attachment_scores(q, keys, feat, S, backend="cpu", check_values=False)
    want = attachment_scores(q, keys, feat, S, backend="reference", check_values=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("binary", [False, True], ids=["clamp", "binary"])
@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 63), (5, 100), (5, 17)])
def test_decode(Tq, Tk, dense, binary, dtype):
    """Queries are the last Tq positions (a KV cache): compact tapes and dense rows tape.dense(rows=Tq)."""
    B, W, V = 3, 60, 5
    tape = compact_tape(B, Tk, seed=Tk, dyck=binary)
    if dense:
        tape = tape.dense(rows=Tq)
    q, keys, feat, grad = make_inputs(B, Tq, Tk, W, V, dtype, seed=Tq * Tk)
    check_against_reference(q, keys, feat, tape, grad, binary)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_forward_reads_strided_keys(dtype):
    """Keys with contiguous [Tk, W] rows at any batch stride -- the prefix of a preallocated key
    cache (NaN past it), a batch-expanded cache -- give exactly the contiguous result, and the
    gradients still match; rows that are not contiguous (a slice of wider rows) are copied."""
    from fastmodels.ops import attachment_scores

    B, Tq, Tk, W, V = 3, 1, 37, 20, 5
    q, keys, feat, _ = make_inputs(B, Tq, Tk, W, V, dtype, seed=8)
    dense = compact_tape(B, Tk, seed=8).dense(rows=Tq)
    want = attachment_scores(q, keys, feat, dense, backend="cpu")
    cache = torch.full((B, Tk + 9, W), float("nan"), dtype=dtype)
    cache[:, :Tk] = keys
    wide = torch.full((B, Tk, W + 3), float("nan"), dtype=dtype)
    wide[..., :W] = keys
    for name, kk in (("capacity prefix", cache[:, :Tk]), ("row-strided (copied)", wide[..., :W])):
        assert not kk.is_contiguous()
        assert torch.equal(attachment_scores(q, kk, feat, dense, backend="cpu"), want), name
    k1 = keys[:1].expand(B, -1, -1)  # batch stride 0
    assert torch.equal(attachment_scores(q, k1, feat, dense, backend="cpu"),
                       attachment_scores(q, k1.contiguous(), feat, dense, backend="cpu"))
    leaves = [x.clone().requires_grad_(True) for x in (q, cache, feat)]
    out = attachment_scores(leaves[0], leaves[1][:, :Tk], leaves[2], dense, backend="cpu")
    g = torch.randn(out.shape, dtype=out.dtype).masked_fill(~torch.isfinite(out), 0)
    got = torch.autograd.grad(out, leaves, g)
    plain = [x.clone().requires_grad_(True) for x in (q, keys, feat)]
    want_g = torch.autograd.grad(attachment_scores(*plain, dense, backend="cpu"), plain, g)
    assert torch.equal(got[0], want_g[0]) and torch.equal(got[2], want_g[2])
    assert torch.equal(got[1][:, :Tk], want_g[1]) and (got[1][:, Tk:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("binary", [False, True], ids=["clamp", "binary"])
def test_low_precision_inputs(binary, dtype):
    """float16 / bfloat16 inputs: float32 scores and gradients rounded to the input dtype, against
    the float64 reference on the same (rounded) input values."""
    B, T, W, V = 3, 63, 60, 5
    tape = compact_tape(B, T, seed=12, dyck=binary)
    q, keys, feat, grad = make_inputs(B, T, T, W, V, dtype, seed=13)
    check_against_reference(q, keys, feat, tape, grad, binary)


@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
@pytest.mark.parametrize("Tq", [40, 7])
def test_masked_upstream_gradient_is_ignored(Tq, dense):
    """NaN / inf in the upstream gradient above the diagonal leaves every gradient finite and equal
    to the gradient with zeros there."""
    B, Tk, W, V = 2, 40, 16, 5
    tape = compact_tape(B, Tk, seed=14)
    if dense:
        tape = tape.dense(rows=Tq)
    q, keys, feat, grad = make_inputs(B, Tq, Tk, W, V, torch.float64, seed=15)
    masked = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
    poisoned = grad.masked_fill(masked, float("nan"))
    poisoned[:, ::2] = poisoned[:, ::2].masked_fill(masked[::2], float("inf"))
    clean = run("cpu", q, keys, feat, tape, grad.masked_fill(masked, 0.0), False)
    dirty = run("cpu", q, keys, feat, tape, poisoned, False)
    for a, b in zip(clean[1:], dirty[1:]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The raw C functions on NaN-filled buffers
# ---------------------------------------------------------------------------------------------


def _ptr(x):
    return 0 if x is None else x.data_ptr()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
@pytest.mark.parametrize("Tq,Tk,W", [(37, 37, 20), (3, 37, 33), (1, 1, 1)])
def test_raw_kernels_write_every_element(Tq, Tk, W, dense, dtype, threads):
    import fastmodels._C as C

    B, V = 2, 4
    tape = compact_tape(B, Tk, seed=Tk + W)
    depth = boundary = S = None
    if dense:
        S = tape.dense(rows=Tq).to(torch.int32).contiguous()
    else:
        depth, boundary = tape.depth, tape.boundary
    q, keys, feat, grad = make_inputs(B, Tq, Tk, W, V, dtype, seed=16)
    masked = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
    grad = grad.to(dtype).masked_fill(masked, float("nan")).contiguous()
    fp64 = dtype == torch.float64

    out = torch.full((B, Tq, Tk), float("nan"), dtype=dtype)
    C.attachment_fwd(q.data_ptr(), keys.data_ptr(), keys.stride(0), feat.data_ptr(), _ptr(depth), _ptr(boundary), _ptr(S),
                     out.data_ptr(), B, Tq, Tk, W, V, False, fp64, threads)
    assert torch.isfinite(out[:, ~masked]).all()
    assert (out[:, masked] == float("-inf")).all()

    results = []
    for _ in range(2):
        dq, dkeys, dfeat = (torch.full(x.shape, float("nan"), dtype=dtype) for x in (q, keys, feat))
        C.attachment_bwd(grad.data_ptr(), q.data_ptr(), keys.data_ptr(), feat.data_ptr(), _ptr(depth), _ptr(boundary),
                         _ptr(S), dq.data_ptr(), dkeys.data_ptr(), dfeat.data_ptr(), B, Tq, Tk, W, V, False, fp64, threads)
        for x in (dq, dkeys, dfeat):
            assert torch.isfinite(x).all()
        results.append((dq, dkeys, dfeat))
    for a, b in zip(*results):  # deterministic for a thread count (dfeat's tables included)
        assert torch.equal(a, b)

    want = run("reference", q, keys, feat, tape if S is None else S, grad.nan_to_num(0.0), False, compute=torch.float64)
    tol = 1e-12 if fp64 else 1e-5
    assert rms_ratio(out[:, ~masked].double(), want[0][:, ~masked]) <= tol
    for a, b in zip(results[0], want[1:]):
        assert rms_ratio(a.double(), b) <= tol


@pytest.mark.parametrize("dense", [False, True], ids=["compact", "dense"])
def test_raw_kernels_without_queries(dense):
    """Tq = 0 (the op itself returns early): dkeys and dfeat are written as zeros."""
    import fastmodels._C as C

    B, Tk, W, V = 2, 9, 5, 3
    tape = compact_tape(B, Tk, seed=17)
    S = torch.zeros(B, 0, Tk, dtype=torch.int32) if dense else None
    depth, boundary = (None, None) if dense else (tape.depth, tape.boundary)
    q, keys, feat, grad = make_inputs(B, 0, Tk, W, V, torch.float32, seed=18)
    grad = grad.float()
    dq, dkeys, dfeat = (torch.full(x.shape, float("nan")) for x in (q, keys, feat))
    C.attachment_bwd(grad.data_ptr(), q.data_ptr(), keys.data_ptr(), feat.data_ptr(), _ptr(depth), _ptr(boundary),
                     _ptr(S), dq.data_ptr(), dkeys.data_ptr(), dfeat.data_ptr(), B, 0, Tk, W, V, False, False, 2)
    assert (dkeys == 0).all() and (dfeat == 0).all()
