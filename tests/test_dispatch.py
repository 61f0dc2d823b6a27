"""Backend selection: explicit argument, FASTMODELS_BACKEND, per-device preference, errors."""

import subprocess
import sys

import pytest
import torch

import fastmodels
from fastmodels import _dispatch
from fastmodels._dispatch import register_op, select_backend


@pytest.fixture
def toy_op():
    name = "_toy_op_for_tests"
    register_op(name, ("reference", "triton", "cpu"), cpu=("cpu", "reference"), cuda=("triton", "reference"),
                check=lambda b, d: "toy cpu kernel disabled" if b == "cpu" else None)
    yield name
    _dispatch._OPS.pop(name)


def test_default_falls_back_past_unavailable(toy_op, monkeypatch):
    monkeypatch.delenv("FASTMODELS_BACKEND", raising=False)
    # The op-specific check disables cpu, so the CPU default is the reference.
    assert select_backend(toy_op, None, "cpu") == "reference"


def test_explicit_unavailable_backend_says_why(toy_op):
    with pytest.raises(RuntimeError, match="toy cpu kernel disabled"):
        select_backend(toy_op, "cpu", "cpu")
    with pytest.raises(RuntimeError, match="has no 'cuda' backend"):
        select_backend(toy_op, "cuda", "cpu")
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        select_backend(toy_op, "fast", "cpu")
    with pytest.raises(TypeError, match="backend"):
        select_backend(toy_op, 3, "cpu")


def test_env_variable(toy_op, monkeypatch):
    monkeypatch.setenv("FASTMODELS_BACKEND", "reference")
    assert select_backend(toy_op, None, "cpu") == "reference"
    monkeypatch.setenv("FASTMODELS_BACKEND", f"electric_image=cpu,{toy_op}=reference")
    assert select_backend(toy_op, None, "cpu") == "reference"
    # every part of the variable is checked, not only the entry of the op being dispatched
    for bad, match in ((f"pushdown=triton,{toy_op}=reference", "unknown op 'pushdown'"),
                       (f"triton,{toy_op}=reference", "'triton' is not an op=backend entry"),
                       (f"electric_image=bogus,{toy_op}=reference", "unknown backend 'bogus' for electric_image")):
        monkeypatch.setenv("FASTMODELS_BACKEND", bad)
        with pytest.raises(ValueError, match=f"FASTMODELS_BACKEND: {match}"):
            select_backend(toy_op, None, "cpu")
    # An env backend the op does not implement leaves it on its default.
    monkeypatch.setenv("FASTMODELS_BACKEND", "cuda")
    assert select_backend(toy_op, None, "cpu") == "reference"
    # An implemented but unavailable env backend is an error, not a silent fallback.
    monkeypatch.setenv("FASTMODELS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="FASTMODELS_BACKEND='cpu' is unavailable"):
        select_backend(toy_op, None, "cpu")
    monkeypatch.setenv("FASTMODELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        select_backend(toy_op, None, "cpu")
    # The explicit argument wins over the environment.
    assert select_backend(toy_op, "reference", "cpu") == "reference"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = _dispatch.backend_unavailable_reason("triton", "cpu")
    if _dispatch._triton_import_error() is None:
        assert "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.backend_unavailable_reason("triton", "cpu") == _dispatch._triton_import_error()


def test_cuda_and_cpu_backends_need_their_devices():
    assert "CUDA tensors" in _dispatch.backend_unavailable_reason("cuda", "cpu")
    assert "CPU tensors" in _dispatch.backend_unavailable_reason("cpu", "cuda")
    if not torch.cuda.is_available():
        assert "no CUDA device" in _dispatch.backend_unavailable_reason("triton", "cuda")


def test_register_op_rejects_bad_declarations():
    with pytest.raises(ValueError, match="unknown backend"):
        register_op("_bad", ("reference", "gpu"), cpu=("reference",), cuda=("reference",))
    with pytest.raises(ValueError, match="unimplemented"):
        register_op("_bad", ("reference",), cpu=("cpu",), cuda=("reference",))
    assert "_bad" not in _dispatch._OPS


def test_backends_report(toy_op):
    report = fastmodels.backends("cpu")
    entry = report[toy_op]
    assert entry["default"] == "reference"
    assert "reference" in entry["available"]
    assert entry["unavailable"]["cpu"] == "toy cpu kernel disabled"
    for op, r in report.items():
        assert r["default"] in r["available"], op
        assert set(r["available"]).isdisjoint(r["unavailable"]), op


def _python(code: str) -> str:
    """The stdout of ``code`` run in a fresh interpreter, which must exit with 0."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_and_backends_without_triton():
    # Block triton's import: fastmodels must still import and report why triton is unavailable.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import fastmodels, json\n"
        "r = fastmodels.backends('cpu')\n"
        "for op, e in r.items():\n"
        "    assert 'triton' not in e['available'], op\n"
        "    assert e['default'] in e['available'], op\n"
        "print('OK', len(r))\n"
    )
    assert _python(code).startswith("OK")


def test_import_loads_no_dynamo_and_marks_as_torch_does():
    """``import fastmodels`` leaves torch._dynamo unloaded (1.1 s of import time on the dev
    machine), and the marker the ops then set on their backend choice by hand is exactly what
    torch.compiler.assume_constant_result sets (which imports dynamo)."""
    code = (
        "import sys, torch, fastmodels, fastmodels.ops\n"
        "from fastmodels.ops import pushdown\n"
        "print('torch._dynamo' in sys.modules)\n"
        "def f():\n"
        "    pass\n"
        "print(vars(pushdown._choose_backend) == vars(torch.compiler.assume_constant_result(f)) != {})\n"
    )
    assert _python(code).split() == ["False", "True"]


def test_cpu_backend_without_extension(monkeypatch):
    name = "_toy_pure_cpu_op"
    register_op(name, ("reference", "cpu"), cpu=("cpu", "reference"), cuda=("reference",), cpu_extension=False)
    try:
        monkeypatch.setattr(_dispatch, "_cpp_extension_error", lambda: "extension missing")
        assert select_backend(name, None, "cpu") == "cpu"
        assert "CPU tensors" in _dispatch.op_backend_unavailable_reason(name, "cpu", "cuda")
    finally:
        _dispatch._OPS.pop(name)


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False), ("false", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """One reading of TRITON_INTERPRET for dispatch and every kernel module (they used to differ:
    'true' enabled Triton on CPU in dispatch while the kernels built their GPU configs)."""
    from fastmodels.kernels._host import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is on and _dispatch.triton_interpreter_enabled() is on
    knobs = pytest.importorskip("triton.knobs")
    if hasattr(knobs, "getenv_bool"):
        assert knobs.getenv_bool("TRITON_INTERPRET", False) is on
