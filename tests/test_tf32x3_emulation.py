"""The tf32x3 emulation tool (bench/tf32x3_emulation.py) rounds and multiplies as documented."""

import torch

from fastmodels.bench.tf32x3_emulation import mm_tf32, mm_tf32x3, tf32


def test_tf32_keeps_ten_mantissa_bits_rounding_to_nearest():
    one_ulp = 2.0**-10
    x = torch.tensor([1 + one_ulp, 1 + one_ulp / 2 - 2**-20, 1 + one_ulp / 2, -(1 + 3 * one_ulp / 4), 3.0])
    want = torch.tensor([1 + one_ulp, 1.0, 1 + one_ulp, -(1 + one_ulp), 3.0])  # halfway rounds away from 0
    assert torch.equal(tf32(x), want)
    y = tf32(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    assert not (y.view(torch.int32) & 0x1FFF).any()  # the low 13 bits are clear


def test_tf32x3_is_near_fp32_and_tf32_is_not():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 48, generator=g), torch.randn(48, 40, generator=g)
    exact = a.double() @ b.double()
    err = lambda c: ((c.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    ieee = err(a @ b)
    assert err(mm_tf32x3(a, b)) < 4 * ieee
    assert err(mm_tf32(a, b)) > 100 * ieee
