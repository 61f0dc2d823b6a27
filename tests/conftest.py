"""Test harness shared by every op's tests.

- ``device``: "cuda" when a GPU is visible (or FASTMODELS_TEST_DEVICE says so), else "cpu".
- Tests parametrized with ``backend="triton"`` are marked ``triton`` automatically; on CPU they
  run only under TRITON_INTERPRET=1 (CI's second pass), otherwise they are skipped with the reason.
- Tests that need CUDA carry the ``gpu`` marker and are skipped without a GPU.
- Fresh allocations are poisoned with NaN (torch.empty and friends), so an output element that a
  kernel never writes fails the comparison. Mark a test ``no_poison`` to opt out (torch.compile
  tests, which would otherwise trace the patched allocator).
- Every test starts from torch.manual_seed(0).
- FASTMODELS_TEST_C_EXTENSION=<path of a built _C module> runs the suite against that build of
  the C++ extension instead of the installed one (tests/test_cpu_isa.py uses it).
"""

import importlib.util
import os
import sys

import pytest
import torch

_C_EXTENSION = os.environ.get("FASTMODELS_TEST_C_EXTENSION")
if _C_EXTENSION:  # run against another build of fastmodels._C (tests/test_cpu_isa.py), loaded first
    _spec = importlib.util.spec_from_file_location("fastmodels._C", _C_EXTENSION)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    sys.modules["fastmodels._C"] = _module
    import fastmodels

    fastmodels._C = _module

from helpers import DEVICE, INTERPRET, poisoned_allocators  # noqa: E402 - after the extension override


def pytest_configure(config):
    if _C_EXTENSION:
        from fastmodels import _C

        if _C.__file__ != _C_EXTENSION:
            raise pytest.UsageError(f"FASTMODELS_TEST_C_EXTENSION: loaded {_C.__file__}, not {_C_EXTENSION}")
    config.addinivalue_line("markers", "no_poison: do not NaN-poison fresh allocations in this test")


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.triton)
        if callspec is not None and callspec.params.get("backend") == "cuda":
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("triton") and DEVICE == "cpu" and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="Triton on CPU needs TRITON_INTERPRET=1 (run tests/run.sh)"))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def deterministic_algorithms():
    """``set(on, warn_only=False)``: torch.use_deterministic_algorithms for one test, restored
    afterwards."""
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield lambda on, warn_only=False: torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.use_deterministic_algorithms(old, warn_only=old_warn)


@pytest.fixture(autouse=True)
def _seed_and_poison(request):
    torch.manual_seed(0)
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    with poisoned_allocators():
        yield
