"""The cpu backend's fp32 softmax weights to a few ulps, over the whole range of exp arguments.

The C++ pass computes exp with its own vectorized polynomial (csrc/include/cpu_simd.h, exp_simd,
documented at most 1 ulp from the correctly rounded exp). The end-to-end tests compare against
float64 at rms tolerances of ~2e-5, which a polynomial or range-reduction slip of ~1e-6 to 1e-4
relative passes. Here each query row sees two keys whose score gap sweeps [-60, 60], and the
value vectors are one-hot, so the output row *is* the softmax row (forward), and dv is the
recomputed P of the backward: both must match float64 to a few fp32 ulps."""

import pytest
import torch
from helpers import op_backend_unavailable_reason

from fastmodels.ops import pushdown_attention
from fastmodels.ops.pushdown import pushdown_attention_blocked
from fastmodels.pushdown import StackTape

pytestmark = pytest.mark.skipif(bool(op_backend_unavailable_reason("pushdown_attention", "cpu", "cpu")),
                                reason="cpu backend unavailable")

ULP = 2.0**-23


def _two_key_rows(gaps: torch.Tensor):
    """B sentences of two tokens; query 1 scores key 0 at 0 and key 1 at ``gap`` (exact in fp32)."""
    B = gaps.numel()
    q = torch.zeros(B, 1, 2, 2)
    q[:, 0, :, 0] = 1.0
    k = torch.zeros(B, 1, 2, 2)
    k[:, 0, 1, 0] = gaps
    v = torch.zeros(B, 1, 2, 2)
    v[:, 0, 0, 0] = 1.0
    v[:, 0, 1, 1] = 1.0
    E = torch.zeros(3, 2)
    tape = StackTape(torch.zeros(B, 2, dtype=torch.int32), torch.zeros(B, 2, dtype=torch.int32))
    return q, k, v, E, tape


def _softmax64(gaps):
    x = torch.stack([torch.zeros_like(gaps), gaps], -1).double()
    return torch.softmax(x, -1)  # [B, 2]


def _assert_ulps(got, want, ulps, what):
    rel = ((got.double() - want) / want).abs()
    worst = int(rel.argmax())
    assert rel.max() <= ulps * ULP, f"{what}: {rel.max() / ULP:.1f} ulps at element {worst} (want {ulps})"


def test_forward_softmax_weights_within_a_few_ulps():
    gaps = torch.linspace(-60.0, 60.0, 2401)
    q, k, v, E, tape = _two_key_rows(gaps)
    out = pushdown_attention(q, k, v, E, tape, scale=1.0, backend="cpu")
    _assert_ulps(out[:, 0, 1], _softmax64(gaps), 4, "P of query 1")  # [B, 2] = (P0, P1)
    assert torch.equal(out[:, 0, 0], v[:, 0, 0])  # query 0 sees key 0 only


def test_backward_recomputed_weights_within_a_few_ulps():
    """The backward recomputes P = exp(x - lse) from the forward's fp32 lse: against exp of that
    same fp32 argument in float64, so that only the exp itself is measured (the rounding of lse
    and of x - lse is the fp32 algorithm's own, up to ~30 ulps of P at |x - lse| = 60)."""
    gaps = torch.linspace(-60.0, 60.0, 2401)
    q, k, v, E, tape = _two_key_rows(gaps)
    _, lse = pushdown_attention_blocked(q, k, v, E, tape.depth, tape.boundary, scale=1.0)
    x = torch.stack([torch.zeros_like(gaps), gaps], -1)  # fp32 logits of query 1
    want = torch.exp((x - lse[:, 0, 1, None]).double())  # the fp32 argument, exp in float64
    v.requires_grad_(True)
    out = pushdown_attention(q, k, v, E, tape, scale=1.0, backend="cpu")
    do = torch.zeros_like(out)
    do[:, 0, 1, 0] = 1.0  # dv[j] = P[1, j] * (1, 0)
    (dv,) = torch.autograd.grad(out, v, do)
    _assert_ulps(dv[:, 0, :, 0], want, 2, "recomputed P of query 1")
