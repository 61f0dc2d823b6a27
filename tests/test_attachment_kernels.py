"""The attachment-score Triton kernels (kernels/attachment.py): the launchers called directly and
the public op ``attachment_scores(..., backend="triton")``, forward and all three gradients,
against the float64 reference of fastmodels.ops.attachment (the factored form materialized).

Compact tapes come from random binary trees (a padded batch of different lengths), and from
arbitrary (depth, boundary) values with the reference's dense tape from the compact formula;
dense tapes hold values beyond V - 1 (clamped) and garbage above the diagonal (never read).
Upstream gradients hold NaN above the diagonal: it must not leak into any gradient. Fresh
allocations are NaN-poisoned (conftest), so an output element the kernels never write fails.
Low-precision inputs are compared with the reference on the same rounded inputs: the kernels
compute in fp32 after loading, so the fp32 tolerance applies to them unchanged.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastmodels.testing import assert_rms_close

pytestmark = pytest.mark.triton

kernels = pytest.importorskip("fastmodels.kernels.attachment")

from fastmodels.ops import attachment_scores  # noqa: E402
from fastmodels.ops.attachment import attachment_scores_reference  # noqa: E402
from fastmodels.pushdown import StackTape  # noqa: E402
from fastmodels.pushdown.tape import dense_from_compact  # noqa: E402

TOL = 1e-5  # RMS-relative, fp32 accumulation against float64


def causal(Tq, Tk):
    """True where key j is visible to query i (at absolute position Tk - Tq + i)."""
    return torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)


def make_inputs(B, Tq, Tk, W, V, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, Tq, W).to(dtype).to(device)
    keys = torch.randn(B, Tk, W).to(dtype).to(device)
    feat = torch.randn(V, W).to(dtype).to(device)
    return q, keys, feat


def upstream(B, Tq, Tk, device):
    """Random upstream gradient, NaN above the diagonal (the kernel must not read it), and the
    same with zeros there for the reference."""
    g = torch.randn(B, Tq, Tk, device=device)
    hidden = ~causal(Tq, Tk).to(device)
    return g.masked_fill(hidden, float("nan")), g.masked_fill(hidden, 0.0)


def reference(q, keys, feat, dense, binary, g):
    """(scores, dq, dkeys, dfeat) in float64 from the reference op on the same (rounded) inputs."""
    leaves = [x.detach().double().requires_grad_() for x in (q, keys, feat)]
    out = attachment_scores_reference(*leaves, dense.to(q.device), binary=binary)
    out.masked_fill(torch.isinf(out), 0.0).backward(g.double())
    return (out.detach(), *(x.grad for x in leaves))


def check(q, keys, feat, depth, boundary, dense, dense_ref, binary, tol=TOL):
    """Launchers vs the reference: scores (with -inf exactly above the diagonal) and gradients."""
    B, Tq, Tk = q.shape[0], q.shape[1], keys.shape[1]
    out = kernels.attachment_fwd(q, keys, feat, depth, boundary, dense, binary)
    g_nan, g_ref = upstream(B, Tq, Tk, q.device)
    dq, dkeys, dfeat = kernels.attachment_bwd(g_nan, q, keys, feat, depth, boundary, dense, binary)
    ref, rdq, rdk, rdf = reference(q, keys, feat, dense_ref, binary, g_ref)
    assert out.dtype == dq.dtype == dkeys.dtype == dfeat.dtype == torch.float32
    vis = causal(Tq, Tk).to(q.device).expand(B, Tq, Tk)
    assert torch.equal(out[~vis], torch.full_like(out[~vis], float("-inf"))), "scores above the diagonal must be -inf"
    assert_rms_close(out[vis], ref[vis], tol, "scores")
    assert_rms_close(dq, rdq, tol, "dq")
    assert_rms_close(dkeys, rdk, tol, "dkeys")
    assert_rms_close(dfeat, rdf, tol, "dfeat")


def random_dense(B, Tq, Tk, V, dtype):
    """Tape values 0..V+2 (beyond V - 1: clamped) plus a few large ones, garbage above the
    diagonal."""
    S = torch.randint(0, V + 3, (B, Tq, Tk))
    S[torch.rand(B, Tq, Tk) < 0.05] = 100 if dtype == torch.int8 else 10**6
    return S.to(dtype)


def random_spans(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Spans of the binary nodes of a random binary tree over tokens [0, n)."""
    spans = []

    def build(a, b):
        if b - a < 1:
            return
        spans.append((a, b))
        m = rng.randint(a, b - 1)
        build(a, m)
        build(m + 1, b)

    build(0, n - 1)
    return spans


def test_grid_limit_is_a_clear_error():
    """The grids are (blocks, B): B above CUDA's 65535 on grid axis 1 is refused up front."""
    q = torch.zeros(65536, 1, 4)
    depth = torch.zeros(65536, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size B must be <= 65535, got B=65536"):
        kernels.attachment_fwd(q, q, torch.zeros(2, 4), depth, depth, None, False)


# (B, Tq, Tk, W, V, binary): T = 1, 7, 33, W = 1 and 20 (several w chunks), decode shapes (Tq < Tk)
SHAPES = [
    (1, 1, 1, 1, 1, False),
    (2, 7, 7, 20, 5, False),
    (1, 33, 33, 20, 2, True),
    (2, 33, 33, 1, 5, False),
    (2, 7, 33, 20, 5, False),
    (1, 1, 33, 20, 2, True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Tq{}Tk{}W{}V{}{}".format(*s[:5], "bin" if s[5] else ""))
@pytest.mark.parametrize("tape_dtype", [torch.int8, torch.int32], ids=["int8", "int32"])
def test_dense_tape(shape, tape_dtype, device):
    B, Tq, Tk, W, V, binary = shape
    q, keys, feat = make_inputs(B, Tq, Tk, W, V, device=device)
    S = random_dense(B, Tq, Tk, V, tape_dtype)
    check(q, keys, feat, None, None, S.to(device), S, binary)


@pytest.mark.parametrize("lengths,Tq,V,binary", [
    ([33, 20], 33, 5, False),  # padded batch of two sentences
    ([7], 7, 2, False),
    ([33, 29], 33, 2, True),
    ([33, 12], 5, 5, False),  # decode: the last 5 rows of 33 keys
    ([33], 1, 2, True),  # one decode row
], ids=["T33pad", "T7", "T33bin", "decode5", "decode1bin"])
def test_compact_tape_from_trees(lengths, Tq, V, binary, device):
    """In-kernel S from (depth, boundary) of random trees, padded to the longest sentence."""
    rng = random.Random(sum(lengths) + Tq)
    tape = StackTape.from_spans([(n, random_spans(n, rng)) for n in lengths])
    B, T, W = len(lengths), tape.seq_len, 20
    q, keys, feat = make_inputs(B, Tq, T, W, V, device=device)
    check(q, keys, feat, tape.depth.to(device), tape.boundary.to(device), None, tape.dense(Tq), binary)


@pytest.mark.parametrize("Tq", [33, 2], ids=["full", "decode"])
def test_compact_tape_arbitrary_values(Tq, device):
    """Arbitrary (depth, boundary) values, incl. int32-saturated "still open" boundaries and
    negative S (read as row 0): every gap, prefix and suffix minimum of the kernels is exercised."""
    B, T, W, V = 2, 33, 20, 6
    g = torch.Generator().manual_seed(1)
    depth = torch.randint(0, 9, (B, T), dtype=torch.int32, generator=g)
    boundary = torch.randint(0, 9, (B, T), dtype=torch.int32, generator=g)
    boundary[:, -1] = 2**31 - 1
    boundary[1, T // 3] = 2**31 - 1
    q, keys, feat = make_inputs(B, Tq, T, W, V, device=device)
    check(q, keys, feat, depth.to(device), boundary.to(device), None, dense_from_compact(depth, boundary, Tq), False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_inputs(dtype, device):
    """fp16/bf16 inputs: loaded, upcast and summed in fp32, so the fp32 tolerance against the
    reference on the same rounded inputs."""
    rng = random.Random(3)
    tape = StackTape.from_spans([(n, random_spans(n, rng)) for n in (33, 17)])
    q, keys, feat = make_inputs(2, 33, 33, 20, 5, dtype=dtype, device=device)
    check(q, keys, feat, tape.depth.to(device), tape.boundary.to(device), None, tape.dense(), False)
    S = random_dense(2, 7, 33, 5, torch.int8)
    q, keys, feat = make_inputs(2, 7, 33, 20, 5, dtype=dtype, device=device)
    check(q, keys, feat, None, None, S.to(device), S, False)


def test_empty_edges(device):
    """No query row (keys no query reaches get zero gradients) and an empty feature axis."""
    q, keys, feat = make_inputs(2, 0, 5, 4, 3, device=device)
    depth = torch.zeros(2, 5, dtype=torch.int32, device=device)
    assert kernels.attachment_fwd(q, keys, feat, depth, depth, None, False).shape == (2, 0, 5)
    dq, dkeys, dfeat = kernels.attachment_bwd(torch.zeros(2, 0, 5, device=device), q, keys, feat, depth, depth, None, False)
    assert dq.shape == (2, 0, 4) and torch.equal(dkeys, torch.zeros_like(dkeys)) and torch.equal(dfeat, torch.zeros_like(dfeat))
    q, keys, feat = make_inputs(1, 3, 4, 0, 2, device=device)
    out = kernels.attachment_fwd(q, keys, feat, None, None, torch.ones(1, 3, 4, dtype=torch.int8, device=device), False)
    expected = torch.zeros(1, 3, 4).masked_fill(~causal(3, 4), float("-inf"))
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("kind", ["compact", "dense"])
@pytest.mark.parametrize("backend", ["triton"])
def test_public_op(kind, backend, device):
    """attachment_scores(..., backend="triton") with autograd against backend="reference" (W = 16:
    the launchers use feat as it is; other widths go through a copy padded to 16-element rows)."""
    B, Tq, T, W, V = 2, 7, 12, 16, 5
    rng = random.Random(5)
    tape = StackTape.from_spans([(n, random_spans(n, rng)) for n in (12, 9)]).to(device)
    arg = tape if kind == "compact" else tape.dense(Tq).to(torch.int8)
    if kind == "compact":
        Tq = T  # a StackTape gives every row
    q, keys, feat = make_inputs(B, Tq, T, W, V, device=device)
    g_nan, g_ref = upstream(B, Tq, T, device)
    leaves = [x.clone().requires_grad_() for x in (q, keys, feat)]
    out = attachment_scores(*leaves, arg, backend=backend)
    out.backward(g_nan)
    ref = [x.double().requires_grad_() for x in (q, keys, feat)]
    rout = attachment_scores(*ref, arg, backend="reference")
    rout.masked_fill(torch.isinf(rout), 0.0).backward(g_ref.double())
    vis = causal(Tq, T).to(device).expand(B, Tq, T)
    assert out.dtype == torch.float32 and torch.isinf(out[~vis]).all()
    assert_rms_close(out[vis], rout[vis], TOL, "scores")
    for name, a, r in zip(("q", "keys", "depth_feat"), leaves, ref):
        assert_rms_close(a.grad, r.grad, TOL, f"d{name}")


def test_nan_in_keys_or_features_propagates_like_the_reference(device):
    """relu(NaN) is NaN (torch.relu, the C++ backend): a NaN key or depth feature must reach the
    scores and dq it touches, not be dropped by tl.maximum's default NaN handling."""
    B, Tq, Tk, W, V = 1, 5, 5, 4, 3
    S = torch.tensor([[[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [2, 2, 1, 0, 0], [2, 2, 1, 1, 0]]], dtype=torch.int32)
    for which in ("keys", "feat"):
        q, keys, feat = make_inputs(B, Tq, Tk, W, V, device=device)
        if which == "keys":
            keys[0, 1, 2] = float("nan")
        else:
            feat[1, 0] = float("nan")
        out = kernels.attachment_fwd(q, keys, feat, None, None, S.to(device), False)
        g = torch.ones(B, Tq, Tk, device=device).masked_fill(~causal(Tq, Tk).to(device), 0.0)
        dq = kernels.attachment_bwd(g, q, keys, feat, None, None, S.to(device), False)[0]
        ref, rdq, _, _ = reference(q, keys, feat, S, False, g)  # on the inputs' device (the GPU run failed here)
        assert ref.isnan().any() and rdq.isnan().any()
        assert torch.equal(out.isnan(), ref.isnan()), which
        assert torch.equal(dq.isnan(), rdq.isnan()), which


def test_backward_follows_torch_deterministic_algorithms(deterministic_algorithms, device):
    """The depth-table gradient is summed with fp32 atomics on a GPU, and the kernels have no
    deterministic twin: under torch.use_deterministic_algorithms(True) the backward refuses, as
    torch's own ops without a deterministic implementation do (warn_only: a warning, and the
    gradients). The forward has no atomics and runs."""
    B, T, W, V = 2, 9, 8, 4
    q, keys, feat = (x.requires_grad_() for x in make_inputs(B, T, T, W, V, device=device))
    S = random_dense(B, T, T, V, torch.int32).to(device)
    g = upstream(B, T, T, device)[1]
    want = torch.autograd.grad(attachment_scores(q, keys, feat, S, backend="triton"), (q, keys, feat), g)
    deterministic_algorithms(True)
    out = attachment_scores(q, keys, feat, S, backend="triton")
    with pytest.raises(RuntimeError, match=r"attachment_scores: the triton backward's depth-table gradient sums with fp32 "
                                           r"atomics.*use backend='reference'"):
        torch.autograd.grad(out, (q, keys, feat), g, retain_graph=True)
    deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="depth-table gradient sums with fp32 atomics"):
        got = torch.autograd.grad(out, (q, keys, feat), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))  # the atomics' order
