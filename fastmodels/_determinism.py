"""``torch.use_deterministic_algorithms`` for the ops.

PyTorch's rule: with deterministic algorithms on, an op that has a deterministic mode uses it, and
one that has none raises an error (a warning with ``warn_only=True``) when it runs. fastmodels
follows it: ``linear_cross_entropy_kl(deterministic=None)`` takes the flag, and the paths that sum
with fp32 atomics and have no deterministic twin call :func:`alert_not_deterministic`.
"""

from __future__ import annotations

import warnings

import torch


def deterministic_default(value) -> bool:
    """``value`` for an explicit True/False, torch's flag for None."""
    return torch.are_deterministic_algorithms_enabled() if value is None else value


def alert_not_deterministic(what: str, way_out: str) -> None:
    """Refuse (or, with ``warn_only=True``, warn about) a nondeterministic path when torch's
    deterministic algorithms are on; a no-op otherwise."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{what} sums with fp32 atomics, so its last bits can change from run to run, but "
           f"torch.use_deterministic_algorithms(True) is set; {way_out}")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(msg)
