"""Sinusoidal position encodings (Vaswani et al.), shared by the LM's absolute positions and the
attachment head's relative ones."""

from __future__ import annotations

import math

import torch


def sinusoidal(start: int, n: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """[n, dim] encodings of positions start .. start + n - 1 (sin in even, cos in odd columns)."""
    pos = torch.arange(start, start + n, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    out = torch.zeros(n, dim, device=device, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out.to(dtype or torch.get_default_dtype())
