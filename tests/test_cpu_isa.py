"""The C++ CPU kernels' per-ISA code. The extension compiles its hot functions for x86-64-v4,
x86-64-v3 and baseline x86-64 and picks one when it loads (csrc/include/cpu_simd.h), so a machine
runs one of the three and the normal test run never sees the others. Here the extension is
rebuilt for one target at a time (FASTMODELS_CXXFLAGS="-DFASTMODELS_CLONES=0 -march=..."), checked to be that build, and
the C++ backends' tests run against it in a subprocess (FASTMODELS_TEST_C_EXTENSION, see
conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the tests of every op with a C++ cpu backend; -k cpu keeps that backend's cases
CPU_TESTS = ["tests/test_pushdown.py", "tests/test_attachment.py", "tests/test_attachment_cpu.py", "tests/test_efield.py"]
VARIANTS = {"x86-64-v3": "-march=x86-64-v3", "baseline": "-march=x86-64"}

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="the per-ISA builds are x86-64 Linux (GCC target_clones)"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler"),
    pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree"),
]


def _build(tmp_path: Path, march: str) -> Path:
    pytest.importorskip("pybind11")
    env = dict(os.environ, FASTMODELS_CXXFLAGS=f"-DFASTMODELS_CLONES=0 {march}", FASTMODELS_REQUIRE_CPP="1", FASTMODELS_BUILD_CPP="1")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "build")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    built = sorted((tmp_path / "lib" / "fastmodels").glob("_C*.so"))
    assert len(built) == 1, built
    return built[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_kernels_on_one_isa(variant, tmp_path):
    so = _build(tmp_path, VARIANTS[variant])
    # the build is what it claims to be: no clones, and no vectors wider than the target's
    assert b"arch_x86_64_v4" not in so.read_bytes(), "FASTMODELS_CLONES=0 still built per-ISA clones"
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in asm
        if variant == "baseline":
            assert "%ymm" not in asm
        else:
            assert "%ymm" in asm
    env = dict(os.environ, FASTMODELS_TEST_C_EXTENSION=str(so))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not triton and not gpu", "-k", "cpu", *CPU_TESTS]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-p", "no:xdist"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and " failed" not in res.stdout, tail

