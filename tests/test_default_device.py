"""CPU tensors while torch's default device is another one (``torch.set_default_device("cuda")``,
or ``with torch.device("cuda"):`` around model code): every op, module and tape helper must
allocate its workspaces where its inputs live. The tests use the meta device as the other
device (CI has no GPU): a buffer created on the default device then fails loudly (cross-device
copy, no data) instead of running. Before, the cpu backend of pushdown_attention put its block
buffers, and the tape builder its rows, on the default device.
"""

import pytest
import torch

from fastmodels import PushdownAttention
from fastmodels.ops import (
    attachment_scores,
    electric_image,
    intruder_dimensions,
    linear_cross_entropy_kl,
    low_rank,
    pushdown_attention,
    randomized_svd,
)
from fastmodels.pushdown import StackTape, StackTapeBuilder

# The NaN-poisoning allocators (conftest) call torch.empty from Python, which the default-device
# context does not reach: they would hide exactly the allocations these tests look for. The
# results are compared with the same calls outside the context, which the op tests poison.
pytestmark = pytest.mark.no_poison

TREES = ["((a b) ((c d) (e (f g))))", "((a (b c)) (d (e f)))"]


def elsewhere():
    return torch.device("meta")


def same(got, want):
    for a, b in zip(got, want):
        assert a.device.type == "cpu", a.device
        assert torch.equal(a, b)


def grads(fn, xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out = out if isinstance(out, tuple) else (out,)
    fin = [o.masked_fill(~torch.isfinite(o), 0) for o in out]
    return (*out, *torch.autograd.grad(sum((o * (i + 1.5)).sum() for i, o in enumerate(fin)), xs))


@pytest.mark.parametrize("kind", ["compact", "dense"])
def test_pushdown_attention_cpu_blocks(monkeypatch, kind):
    import fastmodels.ops.pushdown as P

    monkeypatch.setattr(P, "_block_rows", lambda *a: 3)  # several query blocks: the staging buffers
    tape = StackTape.from_trees(TREES)
    tape = tape if kind == "compact" else tape.dense()
    xs = [torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16), torch.randn(5, 16)]
    fn = lambda q, k, v, E: pushdown_attention(q, k, v, E, tape, backend="cpu")  # noqa: E731
    want = grads(fn, xs)
    with elsewhere():
        got = grads(fn, xs)
        with torch.no_grad():
            got_inference = fn(*xs)
    same(got, want)
    same([got_inference], want[:1])


def test_attachment_scores_cpu():
    tape = StackTape.from_trees(TREES)
    xs = [torch.randn(2, 7, 12), torch.randn(2, 7, 12), torch.randn(4, 12)]
    fn = lambda q, k, f: attachment_scores(q, k, f, tape, backend="cpu")  # noqa: E731
    want = grads(fn, xs)
    with elsewhere():
        got = grads(fn, xs)
    same(got, want)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_linear_cross_entropy_kl(backend, reduction):
    targets = torch.randint(0, 37, (9,))
    targets[::4] = -100
    teacher = torch.randint(0, 9, (4,))
    xs = [torch.randn(9, 16), torch.randn(37, 16), torch.randn(4, 16)]
    fn = lambda h, w, p: linear_cross_entropy_kl(h, w, targets, p, teacher, reduction=reduction, backend=backend)  # noqa: E731
    want = grads(fn, xs)
    with elsewhere():
        got = grads(fn, xs)
    same(got, want)


def test_randomized_svd_family():
    A = torch.randn(3, 40, 30)
    W, G = torch.randn(40, 30), torch.randn(40, 30)

    def calls():
        return [*randomized_svd(A, 5, seed=1), *low_rank(A, [3, 6], seed=1), *randomized_svd([A[0], A[1, :20]], 4, seed=2)[1],
                intruder_dimensions(W, W + 0.3 * G, k=5).max_cos]

    want = calls()
    with elsewhere():
        got = calls()
    same(got, want)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_electric_image(backend):
    B, N, M, R = 3, 2, 4, 8
    args = [torch.rand(B, N, 2) * 10, torch.rand(B, N) * 6, torch.ones(B, N), torch.rand(B, M, 2) * 10,
            torch.rand(B, M) * 0.5 + 0.1, torch.rand(B, M) - 0.5, torch.ones(B, M, dtype=torch.bool), torch.randn(R, 2),
            torch.nn.functional.normalize(torch.randn(R, 2), dim=-1)]
    arena = torch.full((B, 2), 12.0)
    want = electric_image(*args, arena=arena, backend=backend)
    with elsewhere():
        got = electric_image(*args, arena=arena, backend=backend)
    same(got, want)


def test_tapes_and_builder():
    """Tapes are built on the CPU (device=None) and the builder is host-side, whatever the
    default device."""

    def build():
        tape = StackTape.from_trees(TREES)
        dyck = StackTape.from_brackets(["(([]))", "()[]"])
        b = StackTapeBuilder(2)
        rows = [b.push([None, None]), b.push([0, None]), b.push([None, 1])]
        masks = [b.attach_mask]
        b = b.select([1, 0, 0])
        rows.append(b.push([2, None, 0]))
        masks.append(b.attach_mask)
        frac = torch.tensor(StackTape.from_trees(["(" * 40 + "a" + " b)" * 40]).row_uniform_fraction(block_q=4, block_k=4), device="cpu")
        return [tape.depth, tape.boundary, tape.lengths, tape.dense(), tape.attachment_targets(), tape.attachment_mask(),
                dyck.depth, dyck.boundary, *rows, *masks, b.tape().depth, frac]

    want = build()
    with elsewhere():
        got = build()
    same(got, want)


def test_pushdown_module_decodes_from_its_cache():
    """A CPU module under another default device: the full forward, and token-by-token decoding
    whose cache buffers (capacity, growth) are allocated with the keys' device."""
    torch.manual_seed(3)
    m = PushdownAttention(32, 4, max_depth=5)
    tape = StackTape.from_trees(TREES)
    x = torch.randn(2, 7, 32)
    dense = tape.dense()

    def run():
        cache: dict = {}
        with torch.no_grad():
            steps = [m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache) for t in range(7)]
            return [m(x, tape), torch.cat(steps, dim=1), cache["k"]]

    want = run()
    with elsewhere():
        got = run()
    same(got, want)
