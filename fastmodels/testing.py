"""Correctness helpers shared by the tests, the benchmarks and ``fastmodels demo``.

Two tolerance idioms (see STYLE): an RMS-relative error ratio with a NaN check for long
reductions (attention, SVD, field sums), and per-dtype atol/rtol for elementwise and loss ops.
"""

from __future__ import annotations

import torch

# Per-dtype (atol, rtol) for elementwise and loss outputs compared to a float64 reference.
DTYPE_TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (8e-3, 3e-2),
}


def rms_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||ref - out|| / ||ref|| in float64 (inf if ``out`` has a NaN/inf where ``ref`` is finite).

    An all-zero reference compares the absolute norm of ``out`` instead.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {list(out.shape)}, expected {list(ref.shape)}")
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(o).all() and torch.isfinite(r).all():
        return float("inf")
    diff = torch.linalg.vector_norm(o - r).item()
    scale = torch.linalg.vector_norm(r).item()
    return diff / scale if scale > 0 else diff


def assert_rms_close(out: torch.Tensor, ref: torch.Tensor, ratio: float, name: str = "output") -> None:
    """RMS-relative error at most ``ratio``, with no NaN/inf (every element must be written)."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {list(out.shape)} != reference shape {list(ref.shape)}")
    bad = ~torch.isfinite(out.detach().float().cpu())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite elements (first at {idx}); unwritten output?")
    err = rms_ratio(out, ref)
    if not err <= ratio:
        raise AssertionError(f"{name}: RMS-relative error {err:.3e} exceeds {ratio:.1e}")


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None, atol=None, rtol=None, name: str = "output") -> None:
    """Elementwise |out - ref| <= atol + rtol |ref| with per-dtype defaults and a readable report."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {list(out.shape)} != reference shape {list(ref.shape)}")
    d_atol, d_rtol = DTYPE_TOL[dtype or out.dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    nonfinite = ~torch.isfinite(o) & torch.isfinite(r)
    err = (o - r).abs()
    bad = (err > atol + rtol * r.abs()) | nonfinite | (torch.isnan(o) != torch.isnan(r))
    if bad.any():
        n = int(bad.sum())
        flat = torch.nonzero(bad)
        worst = torch.where(bad, torch.nan_to_num(err, nan=float("inf")), torch.zeros_like(err)).flatten().argmax().item()
        widx = list(torch.unravel_index(torch.tensor(worst), o.shape)) if o.dim() else []
        widx = [int(i) for i in widx]
        lines = [
            f"{name}: {n} of {o.numel()} elements mismatch (atol={atol:g}, rtol={rtol:g})",
            f"  worst at {widx}: got {o.flatten()[worst].item():.6g}, expected {r.flatten()[worst].item():.6g}",
            f"  first mismatches at {flat[:5].tolist()}",
            f"  max abs error {torch.nan_to_num(err, nan=float('inf')).max().item():.3e}; RMS-relative {rms_ratio(o, r):.3e}",
        ]
        raise AssertionError("\n".join(lines))


def lowp_error_budget(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, factor: float = 2.0, floor: float = 0.0) -> None:
    """flash-attention's idiom: the kernel's error against a float64 reference is at most
    ``factor`` times the error of PyTorch doing the same math in the same low precision."""
    e_out = rms_ratio(out, ref64)
    e_pt = rms_ratio(torch_lowp, ref64)
    if not e_out <= factor * e_pt + floor:
        raise AssertionError(f"error {e_out:.3e} exceeds {factor}x PyTorch's own low-precision error {e_pt:.3e} (+{floor:g})")
