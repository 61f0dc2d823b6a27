"""Every CUDA C++ source compiles with nvcc for Hopper (sm_90), also on machines without a GPU.

The sources are plain CUDA C++ (no torch headers), so this compiles exactly what
fastmodels._cuda.load_library builds on a GPU machine (there with -shared instead of -c).
"""

from pathlib import Path

import pytest

from fastmodels._cuda import compile_sources
from fastmodels._dispatch import nvcc_path

SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_nvcc_compiles(source, tmp_path):
    compile_sources([source], tmp_path / (source.stem + ".o"), "sm_90", shared=False)
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")
def test_compile_error_is_reported_verbatim(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { this_is_not_defined(); }\n")
    with pytest.raises(RuntimeError, match="this_is_not_defined"):
        compile_sources([bad], tmp_path / "bad.o", "sm_90", shared=False)
