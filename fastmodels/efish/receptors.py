"""Receptor layouts in the fish frame (x forward along the heading, y to the left)."""

from __future__ import annotations

import math

import torch


def receptor_ring(R: int, radius: float = 1.0, *, offset: float = 0.0, dtype=torch.float32, device=None):
    """``R`` receptors on a circle of ``radius`` cm around the fish centre, at uniform angles
    ``offset + 2 pi k / R`` from the heading, with outward unit normals.

    Returns ``(receptor_pos [R, 2], receptor_normal [R, 2])`` for :func:`fastmodels.ops.electric_image`.
    """
    if isinstance(R, bool) or not isinstance(R, int) or R < 1:
        raise ValueError(f"R: expected an int >= 1, got {R!r}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius: expected a finite number > 0, got {radius!r}")
    angle = offset + 2 * math.pi * torch.arange(R, dtype=torch.float64, device=device) / R
    normal = torch.stack((angle.cos(), angle.sin()), -1)
    return (radius * normal).to(dtype), normal.to(dtype)
