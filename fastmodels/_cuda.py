"""CUDA C++ kernels: compiled with nvcc on first use and cached.

Sources in ``csrc/cuda`` are plain CUDA C++ (no torch headers) that export ``extern "C"`` launchers
taking raw device pointers, sizes and a ``cudaStream_t``. They are built into a shared library
with ``nvcc -O3 -shared`` for the visible GPU's architecture, cached under
``FASTMODELS_CACHE_DIR`` (default ``~/.cache/fastmodels``) by a hash of the sources, flags and
nvcc version, and loaded with ctypes. A compiler error is raised with nvcc's output verbatim.

Because the sources need no torch, CI compile-checks exactly the same files with nvcc on a machine
without a GPU (tests/test_cuda_compile.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import threading
from pathlib import Path

from fastmodels._dispatch import nvcc_path

_CSRC_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "csrc",  # source checkout / editable install
    Path(__file__).resolve().parent / "csrc",  # wheel (package data)
)

_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}


def csrc_dir() -> Path:
    for cand in _CSRC_CANDIDATES:
        if (cand / "include").is_dir():
            return cand
    raise FileNotFoundError(f"CUDA sources not found (looked in {[str(c) for c in _CSRC_CANDIDATES]})")


def cache_dir() -> Path:
    root = os.environ.get("FASTMODELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastmodels")
    path = Path(root) / "cuda"
    path.mkdir(parents=True, exist_ok=True)
    return path


def nvcc_flags(arch: str) -> list[str]:
    # No --use_fast_math: approximate division/rsqrt cost the fp32 accuracy the ops promise.
    return ["-O3", "-std=c++17", f"-arch={arch}", "-lineinfo", "-Xcompiler", "-fPIC"]


def default_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def compile_sources(sources: list[Path], output: Path, arch: str, *, shared: bool = True) -> None:
    """Run nvcc; raise RuntimeError carrying its output verbatim on failure."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc was not found: set CUDA_HOME or put nvcc on PATH")
    include = csrc_dir() / "include"
    cmd = [nvcc, *nvcc_flags(arch), f"-I{include}", *(["-shared"] if shared else ["-c"]), "-o", str(output), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")


def load_library(name: str, sources: list[str], arch: str | None = None) -> ctypes.CDLL:
    """Build (once, cached on disk) and load ``csrc/cuda/<sources>`` as a shared library."""
    with _LOCK:
        if name in _LIBS:
            return _LIBS[name]
        arch = arch or default_arch()
        root = csrc_dir()
        paths = [root / "cuda" / s for s in sources]
        headers = sorted((root / "include").glob("*.h"))
        digest = hashlib.sha256()
        for p in [*paths, *headers]:
            digest.update(p.name.encode())
            digest.update(p.read_bytes())
        digest.update(" ".join(nvcc_flags(arch)).encode())
        digest.update(subprocess.run([nvcc_path() or "nvcc", "--version"], capture_output=True, text=True).stdout.encode())
        out = cache_dir() / f"{name}-{arch}-{digest.hexdigest()[:16]}.so"
        if not out.exists():
            tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
            compile_sources(paths, tmp, arch)
            os.replace(tmp, out)
        lib = ctypes.CDLL(str(out))
        _LIBS[name] = lib
        return lib
