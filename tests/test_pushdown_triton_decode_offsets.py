"""Triton pushdown attention with Tq < Tk (KV-cache decoding) at query offsets off = Tk - Tq one or
two short of a tile boundary. The kernels split each query block's key tiles into masked diagonal
tiles and unmasked full ones (forward and dq pass: n_full = (m0 + 1) // BN; dk/dv pass: the first
query block at or past the tile's last key). With off = 0 every block starts on a tile boundary,
so an off-by-one in those bounds only shows when the first query row m0 = off sits just before a
multiple of BN: a full tile that still holds key m0 + 1 would then leak the future key into row
m0. The existing decode shapes (off = 20, 32, 33) never hit that case. Sizes: BN = 16 under the
interpreter; 32 / 64 / 128 on a GPU."""

import random

import pytest
import torch
from helpers import DEVICE, INTERPRET, assert_rms_close

from fastmodels.ops import pushdown_attention
from fastmodels.pushdown import StackTape

pytestmark = pytest.mark.triton

if INTERPRET or DEVICE == "cpu":
    OFFSETS = [14, 15, 30]
else:
    OFFSETS = [14, 30, 62, 63, 126]


def _binary_tree(rng, n):
    if n == 1:
        return "w"
    cut = rng.randint(1, n - 1)
    return [_binary_tree(rng, cut), _binary_tree(rng, n - cut)]


def _run(backend, q, k, v, E, do, tape):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, E)]
    out = pushdown_attention(*leaves, tape, backend=backend)
    return (out, *torch.autograd.grad(out, leaves, do))


@pytest.mark.parametrize("off", OFFSETS)
@pytest.mark.parametrize("backend", ["triton"])
def test_decode_offsets_next_to_a_tile_boundary(off, backend):
    Tq = 3
    Tk = off + Tq
    rng = random.Random(off)
    tape = StackTape.from_trees([_binary_tree(rng, Tk) for _ in range(2)]).to(DEVICE)
    g = torch.Generator().manual_seed(off)
    q, k, v, do = (torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64) for n in (Tq, Tk, Tk, Tq))
    E = torch.randn(5, 16, generator=g, dtype=torch.float64)
    q, k, v, E, do = (x.to(DEVICE) for x in (q, k, v, E, do))
    rows = tape.dense()[:, off:]  # the decoding queries' dense tape rows [B, Tq, Tk]
    ref = _run("reference", q, k, v, E, do, rows)
    for t in (rows.to(torch.int32), tape):
        got = _run(backend, *(x.float() for x in (q, k, v, E, do)), t)
        for name, a, r in zip(("out", "dq", "dk", "dv", "d_depth_emb"), got, ref):
            assert_rms_close(a, r, 2e-5, name=f"off={off} {name}")
