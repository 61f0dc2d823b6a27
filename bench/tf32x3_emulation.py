"""How accurate are 3xTF32 ("tf32x3") dots for pushdown attention in fp32? A CPU emulation.

The Triton kernels compute fp32 dots with D <= 64 as three TF32 tensor-core products (see
kernels/pushdown.py, _fp32_precision), which neither the CPU nor the Triton interpreter executes.
This emulates them in PyTorch: each fp32 operand x is split into hi = tf32(x) and
lo = tf32(x - hi) (round to nearest, 10 mantissa bits, as cvt.rna.tf32.f32), and a @ b becomes
(hi_a @ lo_b + lo_a @ hi_b) + hi_a @ hi_b with fp32 accumulation (the products of two TF32 values
are exact in fp32). Every product of the gather-form forward and of its backward goes through it,
on the inputs of tests/test_pushdown.py::test_long_peaked_rows_fp32_as_accurate_as_reference
(T = 2048, a deep binary Dyck tape, peaked scores, an offset depth table), which on a GPU holds the
Triton kernels to 2x the fp32 reference's error against float64.

    python -m fastmodels.bench.tf32x3_emulation

prints each output's error against float64 for tf32x3, single TF32 and IEEE fp32. On the 2-core
dev CPU (2026-11-27): tf32x3 1.01-1.09x the IEEE error (out, dq, dk, dv, dE), single TF32
740-2300x. The emulation says nothing about speed, and MMA accumulation order differs from BLAS's.
"""

from __future__ import annotations

import random

import torch

from fastmodels.pushdown import StackTape


def tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10 mantissa bits (nearest, ties away from zero)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ah, bh = tf32(a), tf32(b)
    al, bl = tf32(a - ah), tf32(b - bh)
    return (ah @ bl + al @ bh) + ah @ bh


def mm_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return tf32(a) @ tf32(b)


def _through(mm):
    """A differentiable matmul whose forward and backward products all go through ``mm``."""

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return mm(a, b)

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            return mm(g, b.mT), mm(a.mT, g)

    return Product.apply


def _attention(q, k, v, E, S, scale, mm):
    """Gather-form pushdown attention on a binary tape, every product through ``mm``."""
    B, H, T, _ = q.shape
    qe = mm(q, E.mT.expand(B, H, *E.mT.shape))
    s = mm(q, k.mT) + qe.gather(-1, (S > 0).long()[:, None].expand(B, H, T, T))
    s = (scale * s).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return mm(s.softmax(-1), v)


def _inputs():
    rng = random.Random(3)
    stack, brackets = 0, []
    for i in range(2048):  # as the T = 2048 test builds it
        close = stack and (stack >= 200 or rng.random() < 0.5 or stack >= 2048 - i)
        brackets.append(")" if close else "(")
        stack += -1 if close else 1
    S = StackTape.from_brackets(["".join(brackets)]).dense()
    g = torch.Generator().manual_seed(2)
    q = 5 * torch.randn(1, 2, 2048, 32, generator=g)
    k, v, do = (torch.randn(1, 2, 2048, 32, generator=g) for _ in range(3))
    E = 10 + torch.randn(50, 32, generator=g)
    return q, k, v, E, do, S


def errors() -> dict:
    """{precision: [relative error of out, dq, dk, dv, dE against float64]}."""
    q, k, v, E, do, S = _inputs()

    def run(mm, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v, E)]
        out = _attention(*leaves, S, 32**-0.5, mm)
        return [out.detach(), *torch.autograd.grad(out, leaves, do.to(dtype))]

    exact = run(torch.matmul, torch.float64)
    result = {}
    for name, mm, dtype in (("ieee", torch.matmul, torch.float32), ("tf32x3", _through(mm_tf32x3), torch.float32),
                            ("tf32", _through(mm_tf32), torch.float32)):
        got = run(mm, dtype)
        result[name] = [((a.double() - x).norm() / x.norm()).item() for a, x in zip(got, exact)]
    return result


def main() -> None:
    errs = errors()
    print("relative error against float64     out       dq        dk        dv        dE")
    for name, row in errs.items():
        ratios = "  ".join(f"{e / r:7.2f}x" for e, r in zip(row, errs["ieee"]))
        print(f"{name:8s}" + "".join(f"{e:10.2e}" for e in row) + "   (" + ratios + " of ieee)")


if __name__ == "__main__":
    main()
