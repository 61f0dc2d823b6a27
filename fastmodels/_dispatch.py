"""Backend registry and selection.

Every op has a subset of four backends:

* ``reference`` -- pure PyTorch, float64-capable; the test oracle and the fallback of last resort.
* ``triton``    -- Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``cuda``      -- CUDA C++ kernels, compiled with nvcc on first use and cached.
* ``cpu``       -- C++ CPU kernels in the ``fastmodels._C`` extension built by setup.py.

Choice, in order: the explicit ``backend=`` argument, else the ``FASTMODELS_BACKEND`` environment
variable (``triton`` for every op, or ``op=backend,op=backend``), else the op's preference order for
the tensors' device restricted to what is available. Asking for an unavailable backend raises a
``RuntimeError`` that says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from fastmodels.kernels._host import interpreting  # plain Python: importing it loads no triton

BACKENDS = ("reference", "triton", "cuda", "cpu")


@dataclass(frozen=True)
class OpInfo:
    """What an op implements and which backend it prefers on each device type."""

    name: str
    backends: tuple[str, ...]
    preference: dict[str, tuple[str, ...]]
    # Extra per-op availability check: (backend, device_type) -> reason it is unavailable, or None.
    check: Callable[[str, str], str | None] | None = field(default=None, compare=False)
    # Whether the op's ``cpu`` backend lives in the C++ extension fastmodels._C (False: a CPU path
    # written in PyTorch, e.g. a chunked algorithm, that needs no extension).
    cpu_extension: bool = True


_OPS: dict[str, OpInfo] = {}


def register_op(
    name: str,
    backends: tuple[str, ...],
    *,
    cpu: tuple[str, ...],
    cuda: tuple[str, ...],
    check: Callable[[str, str], str | None] | None = None,
    cpu_extension: bool = True,
) -> OpInfo:
    """Declare an op, the backends it implements and its preference order per device type.

    ``cpu_extension=False`` declares a ``cpu`` backend that does not need the C++ extension."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"register_op({name!r}): unknown backend {b!r}; expected one of {BACKENDS}")
    for order in (cpu, cuda):
        missing = set(order) - set(backends)
        if missing:
            raise ValueError(f"register_op({name!r}): preference names unimplemented backends {sorted(missing)}")
    info = OpInfo(name, tuple(backends), {"cpu": tuple(cpu), "cuda": tuple(cuda)}, check, cpu_extension)
    _OPS[name] = info
    return info


def registered_ops() -> dict[str, OpInfo]:
    return dict(_OPS)


# --------------------------------------------------------------------------------------------
# Availability of each backend, independent of the op
# --------------------------------------------------------------------------------------------


def triton_interpreter_enabled() -> bool:
    return interpreting()


@lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - report any import failure verbatim
        return f"triton failed to import: {exc!r}"
    return None


@lru_cache(maxsize=None)
def _cpp_extension_error() -> str | None:
    try:
        importlib.import_module("fastmodels._C")
    except ImportError as exc:
        return (
            "the C++ extension fastmodels._C is not built "
            f"({exc}); reinstall with a C++ compiler: pip install -e . (FASTMODELS_REQUIRE_CPP=1 shows the error)"
        )
    return None


def cpp_simd_target() -> str | None:
    """The code the C++ extension's per-ISA hot loops run on this CPU ("x86-64-v4", ...); None
    without the extension or with one built before it reported this."""
    if _cpp_extension_error() is not None:
        return None
    import fastmodels._C as C

    return C.simd_target() if hasattr(C, "simd_target") else None


def cpp_symbol_check(symbol: str, what: str) -> Callable[[str, str], str | None]:
    """An op's ``check``: its ``cpu`` backend needs ``fastmodels._C.<symbol>``, which an extension
    built before the op's kernels lacks (a missing extension is reported by the dispatcher)."""

    def check(backend: str, device_type: str) -> str | None:
        if backend != "cpu":
            return None
        try:
            import fastmodels._C as C
        except ImportError:
            return None
        if not hasattr(C, symbol):
            return f"fastmodels._C predates the {what} kernels: rebuild it (pip install --no-build-isolation -e .)"
        return None

    return check


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def backend_unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` tensors, or None if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    if device_type not in ("cpu", "cuda"):
        return f"device type {device_type!r} is not supported (expected cpu or cuda)"
    if backend == "reference":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is visible to torch"
        if not triton_interpreter_enabled():
            return "Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing fastmodels"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend needs CUDA tensors"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        if nvcc_path() is None:
            return "nvcc was not found (set CUDA_HOME or put nvcc on PATH); CUDA C++ kernels compile on first use"
        return None
    # backend == "cpu"
    if device_type != "cpu":
        return "the cpu backend needs CPU tensors"
    return _cpp_extension_error()


def op_backend_unavailable_reason(op: str, backend: str, device_type: str) -> str | None:
    info = _OPS[op]
    if backend not in info.backends:
        return f"{op} has no {backend!r} backend (it has {', '.join(info.backends)})"
    if backend == "cpu" and not info.cpu_extension:
        reason = None if device_type == "cpu" else "the cpu backend needs CPU tensors"
    else:
        reason = backend_unavailable_reason(backend, device_type)
    if reason is None and info.check is not None:
        reason = info.check(backend, device_type)
    return reason


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)  # select_backend runs on every eager op call; the variable rarely changes
def _parse_env_backend(raw: str) -> str | dict[str, str] | None:
    """FASTMODELS_BACKEND: one backend for every op, or ``op=backend`` entries separated by commas.
    Every part is checked (a misspelt op or backend is an error, not silently ignored)."""
    raw = raw.strip()
    if not raw:
        return None
    if "=" not in raw:
        if raw not in BACKENDS:
            raise ValueError(f"FASTMODELS_BACKEND: unknown backend {raw!r}; expected one of {BACKENDS}, or op=backend entries")
        return raw
    choices: dict[str, str] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq:
            raise ValueError(f"FASTMODELS_BACKEND: {part.strip()!r} is not an op=backend entry (a single backend for "
                             f"every op cannot be mixed with per-op entries)")
        if name not in _OPS:
            raise ValueError(f"FASTMODELS_BACKEND: unknown op {name!r}; registered: {sorted(_OPS)}")
        if value not in BACKENDS:
            raise ValueError(f"FASTMODELS_BACKEND: unknown backend {value!r} for {name}; expected one of {BACKENDS}")
        choices[name] = value
    return choices


def _env_choice(op: str) -> str | None:
    parsed = _parse_env_backend(os.environ.get("FASTMODELS_BACKEND", ""))
    return parsed.get(op) if isinstance(parsed, dict) else parsed


def constant_under_compile(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)``: torch.compile evaluates ``fn`` once at trace
    time (the backend choice reads the environment and imports modules, which dynamo does not
    trace). That function imports torch._dynamo, 1.1 s of a 3.2 s ``import fastmodels`` on the dev
    machine; when dynamo is not loaded yet, this sets the marker it reads instead (the attribute
    torch 2.x's decorator sets: tests/test_dispatch.py compares the two, and the pushdown module's
    torch.compile(fullgraph=True) tests fail without it)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def select_backend(op: str, backend: str | None, device: torch.device | str) -> str:
    """Resolve which backend runs ``op`` on tensors of ``device``.

    An explicit ``backend`` must be implemented and available. ``FASTMODELS_BACKEND`` is used for
    every op that implements the named backend (so ``FASTMODELS_BACKEND=triton`` leaves ops without
    a Triton kernel on their defaults) and must then be available. Otherwise the first available
    backend of the op's preference order for the device type wins.
    """
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_OPS)}")
    info = _OPS[op]
    device_type = torch.device(device).type
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS} or None")
        reason = op_backend_unavailable_reason(op, backend, device_type)
        if reason:
            raise RuntimeError(f"{op}: backend={backend!r} is unavailable for {device_type} tensors: {reason}")
        return backend
    env = _env_choice(op)
    if env is not None:
        if env in info.backends:
            reason = op_backend_unavailable_reason(op, env, device_type)
            if reason:
                raise RuntimeError(
                    f"{op}: FASTMODELS_BACKEND={env!r} is unavailable for {device_type} tensors: {reason}"
                )
            return env
    order = info.preference.get(device_type)
    if not order:
        raise RuntimeError(f"{op}: no backend runs on {device_type} tensors")
    reasons = []
    for b in order:
        reason = op_backend_unavailable_reason(op, b, device_type)
        if reason is None:
            return b
        reasons.append(f"{b}: {reason}")
    raise RuntimeError(f"{op}: no backend is available for {device_type} tensors ({'; '.join(reasons)})")


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backends(device: torch.device | str | None = None) -> dict[str, dict]:
    """Per op: the backends available for ``device`` (default: cuda if visible, else cpu), in
    preference order, the default choice, and the reason each other backend is unavailable."""
    _load_all_ops()
    device_type = torch.device(device).type if device is not None else default_device_type()
    report = {}
    for name, info in sorted(_OPS.items()):
        available, unavailable = [], {}
        order = list(info.preference.get(device_type, ())) + [b for b in info.backends]
        for b in dict.fromkeys(order):
            reason = op_backend_unavailable_reason(name, b, device_type)
            if reason is None:
                available.append(b)
            else:
                unavailable[b] = reason
        try:
            default = select_backend(name, None, device_type)
        except (RuntimeError, ValueError) as exc:
            default = f"error: {exc}"
        report[name] = {"device": device_type, "available": available, "default": default, "unavailable": unavailable}
    return report


def _load_all_ops() -> None:
    # Importing the ops package registers every op.
    importlib.import_module("fastmodels.ops")
