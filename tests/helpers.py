"""Helpers importable by test modules (``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastmodels._dispatch import op_backend_unavailable_reason, registered_ops, triton_interpreter_enabled
from fastmodels.testing import assert_close, assert_rms_close, rms_ratio  # noqa: F401 - re-exported

INTERPRET = triton_interpreter_enabled()
DEVICE = os.environ.get("FASTMODELS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
# Tiny shapes on CPU (the Triton interpreter costs ~0.5 ms per program instance per op).
SMALL = DEVICE == "cpu"


def pick(small, full):
    """``small`` on CPU / under the interpreter, ``full`` on a GPU."""
    return small if SMALL else full


def op_backends(op: str, *, include_reference: bool = False) -> list:
    """pytest params for every non-reference backend of ``op`` (triton/cuda get their markers;
    an unavailable backend is skipped with the dispatcher's reason)."""
    info = registered_ops()[op]
    params = []
    for b in info.backends:
        if b == "reference" and not include_reference:
            continue
        marks = []
        if b == "triton":
            marks.append(pytest.mark.triton)
        if b == "cuda":
            marks.append(pytest.mark.gpu)
        device_type = "cuda" if b == "cuda" else DEVICE
        if b == "cpu" and DEVICE != "cpu":
            device_type = "cpu"
        reason = op_backend_unavailable_reason(op, b, device_type)
        if reason and b not in ("triton", "cuda"):
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(b, marks=marks, id=b))
    return params


def backend_device(backend: str) -> str:
    """The device a backend's test runs on: the C++ cpu backend always on CPU."""
    return "cpu" if backend == "cpu" else DEVICE


_ALLOCATORS = ("empty", "empty_like", "empty_strided")


@contextlib.contextmanager
def poisoned_allocators():
    """Fill fresh floating-point allocations with NaN (integer ones with -1 bit patterns)."""
    originals = {name: getattr(torch, name) for name in _ALLOCATORS}

    def wrap(fn):
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool and t.numel():
                t.fill_(-1)
            return t

        return poisoned

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def load_cuda_emulation(source: str, out_dir) -> ctypes.CDLL:
    """tests/cuda_emulation/<source> (a CUDA kernel's own .cu included into C++ against the
    threaded block emulation) built with g++ into ``out_dir`` and loaded with ctypes; skips the
    calling test where g++ is missing."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    root = Path(__file__).resolve().parent.parent
    lib = Path(out_dir) / (Path(source).stem + ".so")
    cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{root / 'csrc' / 'include'}",
           str(root / "tests" / "cuda_emulation" / source), "-o", str(lib)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return ctypes.CDLL(str(lib))
