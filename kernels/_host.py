"""Integer helpers, launch options and the device guard of the host-side launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunction objects (usable inside
@triton.jit code): a call from Python costs ~2 us, and the launchers make a dozen per op call (grid
lambdas included), a visible share of the host time of a short call. These are the same functions
in plain Python (``next_power_of_2(0) == 0`` as in Triton).
"""

from __future__ import annotations

import functools
import os

import torch


# Compile options of every launch. FMA contraction: Triton 3.9 compiles with it unless told
# otherwise, warns that 3.10 will not, and the kernels' instruction counts and error analyses
# (docs/*.md) assume it, so the launches ask for it instead of inheriting the version's default.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

MAX_GRID_X = 2**31 - 1  # CUDA's limit on launch grid axis 0
MAX_GRID_YZ = 65535  # and on axes 1 and 2


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: TRITON_INTERPRET read as Triton reads it
    (1/true/yes/on, any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2)."""
    n = int(n)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _first_device(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, torch.device):
            return a
    return None


def on_tensor_device(launcher):
    """Run a host launcher with the CUDA device of its first tensor (or torch.device) argument
    current. Triton launches on the current device, which need not be the tensors' (a model spread
    over GPUs with ``device_map="auto"``, or tensors on ``cuda:1`` without ``set_device``): a
    kernel launched there with pointers into another GPU fails, or reads another GPU's memory
    without an error. A no-op for CPU tensors and when the device is already current."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        dev = _first_device(args, kwargs)
        if dev is None or dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(dev):
            return launcher(*args, **kwargs)

    guarded.on_tensor_device = True
    return guarded
