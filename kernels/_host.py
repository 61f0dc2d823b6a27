"""Integer helpers and launch options for the host-side launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ConstexprFunction objects (usable inside
@triton.jit code): a call from Python costs ~2 us, and the launchers make a dozen per op call (grid
lambdas included), a visible share of the host time of a short call. These are the same functions
in plain Python (``next_power_of_2(0) == 0`` as in Triton).
"""

from __future__ import annotations

import os


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
