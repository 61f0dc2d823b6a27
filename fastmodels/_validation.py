"""Argument validation shared by every op.

Each helper raises ``ValueError`` (wrong shape, value or range) or ``TypeError`` (wrong type or
dtype) whose message names the argument and says what was expected, so that a bad input never
reaches a kernel. Shapes are checked against named dimensions that are bound on first sight::

    dims = {}
    check_tensor(q, "q", shape=("B", "H", "T", "D"), dims=dims, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", shape=("B", "H", "S", "D"), dims=dims, dtypes=(q.dtype,))
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

ShapeSpec = Sequence["int | str | None"]


def _fmt_spec(spec: ShapeSpec) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in spec) + "]"


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    x,
    name: str,
    *,
    shape: ShapeSpec | None = None,
    ndim: int | tuple[int, ...] | None = None,
    dims: dict | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | str | None = None,
    contiguous: bool = False,
    allow_empty: bool = True,
    dtype_of: str | None = None,
    device_of: str | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of the expected shape, dtype and device; return it.

    ``shape`` entries: an int (exact size), a str (named dim, bound in ``dims`` on first use and
    compared afterwards) or None (any size). ``dtype_of`` / ``device_of``: the argument that a
    single expected dtype / the device was taken from, named in the error (the odd one out may be
    either of the two).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got shape {list(x.shape)}")
    if shape is not None:
        if x.dim() != len(shape):
            raise ValueError(f"{name}: expected shape {_fmt_spec(shape)}, got {list(x.shape)}")
        bound = {} if dims is None else dims
        for axis, (want, got) in enumerate(zip(shape, x.shape)):
            if want is None:
                continue
            if isinstance(want, int):
                if got != want:
                    raise ValueError(f"{name}: expected shape {_fmt_spec(shape)} with size {want} at dim {axis}, got {list(x.shape)}")
                continue
            if want in bound and bound[want] != got:
                raise ValueError(
                    f"{name}: expected shape {_fmt_spec(shape)} with {want}={bound[want]} "
                    f"(from an earlier argument), got {list(x.shape)}"
                )
            bound[want] = got
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            want = f"in ({_dtype_names(dtypes)})" if dtype_of is None else f"{_dtype_names(dtypes)} (the dtype of {dtype_of})"
            raise TypeError(f"{name}: expected dtype {want}, got {str(x.dtype).replace('torch.', '')}")
    if device is not None:
        device = device if isinstance(device, torch.device) else torch.device(device)
        if x.device != device:
            of = "" if device_of is None else f" (the device of {device_of})"
            raise ValueError(f"{name}: expected a tensor on {device}{of}, got one on {x.device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {list(x.shape)}")
    return x


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors on one device; return it."""
    device, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of {first}), got one on {t.device}")
    if device is None:
        raise ValueError("check_same_device: no tensor given")
    return device


def check_same_dtype(**tensors) -> torch.dtype:
    dtype, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if dtype is None:
            dtype, first = t.dtype, name
        elif t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {str(dtype).replace('torch.', '')} (the dtype of {first}), got {str(t.dtype).replace('torch.', '')}")
    return dtype


def check_range(x: torch.Tensor, name: str, low=None, high=None, *, high_inclusive: bool = True) -> torch.Tensor:
    """Elements of ``x`` in [low, high] (or [low, high) with high_inclusive=False).

    Costs one reduction (and a host sync on CUDA): call it on small index tensors only.
    """
    if x.numel() == 0:
        return x
    if low is not None:
        lo = x.min().item()
        if lo < low:
            raise ValueError(f"{name}: expected values >= {low}, got a minimum of {lo}")
    if high is not None:
        hi = x.max().item()
        if hi > high or (not high_inclusive and hi >= high):
            bound = f"<= {high}" if high_inclusive else f"< {high}"
            raise ValueError(f"{name}: expected values {bound}, got a maximum of {hi}")
    return x


def has_nonfinite(x: torch.Tensor, dims=None) -> torch.Tensor:
    """Bool tensor: whether x (or each slice, reducing ``dims``) holds NaN or inf. One summing pass
    that writes nothing of x's size (a sum is NaN or inf when an entry is); a sum that overflows on
    finite entries is a false alarm, so callers confirm flagged slices with ``torch.isfinite``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ~torch.isfinite(x.sum(dim=dims, dtype=acc))


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.is_floating_point() and x.numel() and bool(has_nonfinite(x)) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return x


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """A Python integer (bool rejected) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if low is not None and value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected an int <= {high}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """A Python bool (NumPy's and 0/1 ints rejected: a flag passed the wrong way is an error)."""
    if not isinstance(value, bool):
        kind = type(value)
        raise TypeError(f"{name}: expected a bool, got {kind.__name__ if kind.__module__ == 'builtins' else kind.__module__ + '.' + kind.__name__}")
    return value


def check_float(value, name: str, *, low: float | None = None, high: float | None = None, allow_none: bool = False):
    """A finite real number (Python or NumPy; bool rejected) in [low, high], as a Python float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name}: expected a number >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected a number <= {high}, got {value}")
    return value


def check_choice(value, name: str, choices: Sequence) -> object:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value
