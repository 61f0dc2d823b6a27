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
CPU_TESTS = ["tests/test_pushdown.py", "tests/test_pushdown_cpu_softmax_ulps.py", "tests/test_attachment.py", "tests/test_attachment_cpu.py",
             "tests/test_efield.py"]
VARIANTS = {"x86-64-v3": "-march=x86-64-v3", "baseline": "-march=x86-64"}
# /proc/cpuinfo flags a CPU needs to run x86-64-v3 code (LZCNT shows as abm or lzcnt)
V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
# the pushdown passes whose float exp loops must be vectorized in every build (the exp converts n
# to float with a packed cvtdq2ps; a scalar loop would use cvtsi2ss). The loops are in the
# *_row<float> functions, or in *_block<float> where a single-target build inlines those.
EXP_PASSES = ("fwd", "bwd")

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="the per-ISA builds are x86-64 Linux (GCC target_clones)"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler"),
    pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree"),
]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _functions(so: Path) -> dict:
    """Demangled function name -> its disassembly (objdump -d)."""
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True).stdout
    funcs, name = {}, None
    for line in asm.splitlines():
        if line.endswith(">:") and "<" in line:
            name = line[line.index("<") + 1 : -2]
            funcs[name] = []
        elif name is not None:
            funcs[name].append(line)
    return {k: "\n".join(v) for k, v in funcs.items()}


def _exp_rows_vectorized(funcs: dict, clones: tuple) -> None:
    for kind in EXP_PASSES:
        for clone in clones:
            found = [f for f in funcs if clone in f and (f"{kind}_row<float>" in f or f"{kind}_block<float>" in f)]
            assert found, f"no {kind}_row<float> {clone} in the extension"
            assert any("cvtdq2ps" in funcs[f] for f in found), f"{found}: the exp loop is not vectorized"


V4_FLAGS = V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def test_simd_target_is_this_cpus():
    """fastmodels._C.simd_target() (shown by `fastmodels info`, recorded in CPU bench rows) names
    the clone the loader picks for this CPU."""
    C = pytest.importorskip("fastmodels._C")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags")
    expected = "x86-64-v4" if V4_FLAGS <= flags else "x86-64-v3" if V3_FLAGS <= flags else "x86-64 (baseline)"
    assert C.simd_target() == expected


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_installed_extension_vectorizes_exp_in_every_clone():
    """The loaded extension's x86-64-v4, v3 and baseline clones all vectorize the exp loops (with
    GCC's default -ftrapping-math only the AVX-512 clone did: the v3 and baseline clones ran them
    scalar; in a v3 build the exp loop alone took 2.63 instead of 0.45 ns per element)."""
    C = pytest.importorskip("fastmodels._C")
    _exp_rows_vectorized(_functions(Path(C.__file__)), ("arch_x86_64_v4", "arch_x86_64_v3", ".default"))


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
    if variant == "x86-64-v3" and not V3_FLAGS <= _cpu_flags():
        pytest.skip(f"this CPU cannot run x86-64-v3 code (lacks {sorted(V3_FLAGS - _cpu_flags())})")
    so = _build(tmp_path, VARIANTS[variant])
    # the build is what it claims to be: one version of each function, no vectors wider than the
    # target's, the exp loops vectorized
    if shutil.which("objdump"):
        funcs = _functions(so)
        assert any("fwd_block<float>" in f for f in funcs), "no symbols to check (stripped?)"
        assert not any("[clone .arch_" in f for f in funcs), "FASTMODELS_CLONES=0 still built per-ISA clones"
        asm = "\n".join(funcs.values())
        assert "%zmm" not in asm
        assert ("%ymm" in asm) == (variant != "baseline")
        _exp_rows_vectorized(funcs, ("",))
    else:
        assert b"arch_x86_64_v4" not in so.read_bytes(), "FASTMODELS_CLONES=0 still built per-ISA clones"
    load = ("import importlib.util as u, sys; s = u.spec_from_file_location('fastmodels._C', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.simd_target())")
    target = subprocess.run([sys.executable, "-c", load, str(so)], capture_output=True, text=True, check=True).stdout.strip()
    assert target == "one build for the compiler's target (no per-ISA clones)"
    env = dict(os.environ, FASTMODELS_TEST_C_EXTENSION=str(so))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not triton and not gpu", "-k", "cpu", *CPU_TESTS]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-p", "no:xdist"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and " failed" not in res.stdout, tail

