"""Autotuning switch shared by the kernel modules.

FASTMODELS_AUTOTUNE=0 keeps only the first GPU config of every autotuned kernel: one compile per
kernel variant instead of one per config. The GPU test run uses it (tests check results; the
benchmarks tune), and so can users who want a fast first call. Read once, at import.
"""

from __future__ import annotations

import os

AUTOTUNE = os.environ.get("FASTMODELS_AUTOTUNE", "1") != "0"


def gpu_configs(configs: list) -> list:
    """``configs`` when autotuning, else its first entry alone."""
    return list(configs) if AUTOTUNE else list(configs[:1])
