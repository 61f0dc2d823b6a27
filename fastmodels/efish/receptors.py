"""Receptor layouts in the fish frame (x forward along the heading, y to the left)."""

from __future__ import annotations

import math

import torch

from fastmodels._validation import check_float, check_int


def receptor_ring(R: int, radius: float = 1.0, *, offset: float = 0.0, dtype=torch.float32, device=None):
    """``R`` receptors on a circle of ``radius`` cm around the fish centre, at uniform angles
    ``offset + 2 pi k / R`` from the heading, with outward unit normals.

    Returns ``(receptor_pos [R, 2], receptor_normal [R, 2])`` for :func:`fastmodels.ops.electric_image`.
    """
    R = check_int(R, "R", low=1)
    # 0-d tensors (e.g. a sampled offset) are taken as numbers
    radius, offset = (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for v in (radius, offset))
    radius = check_float(radius, "radius")
    if radius <= 0:
        raise ValueError(f"radius: expected a finite number > 0, got {radius!r}")
    offset = check_float(offset, "offset")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if radius > torch.finfo(dtype).max:
        raise ValueError(f"radius: expected a number representable in {str(dtype).replace('torch.', '')}, got {radius!r}")
    angle = offset + 2 * math.pi * torch.arange(R, dtype=torch.float64, device=device) / R
    normal = torch.stack((angle.cos(), angle.sin()), -1)
    return (radius * normal).to(dtype), normal.to(dtype)
