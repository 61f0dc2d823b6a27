"""The launchers' helpers: plain-Python integer helpers that agree with Triton's constexpr
functions, and the device guard every launcher runs under."""

import ast
import contextlib
from pathlib import Path

import pytest
import torch
import triton

from fastmodels.kernels._host import cdiv, next_power_of_2, on_tensor_device


def test_cdiv_and_next_power_of_2_match_triton():
    for n in range(0, 600):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 127, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(2**40 + 1) == 2**41


# ---------------------------------------------------------------------------------------------
# The device guard of the launchers
# ---------------------------------------------------------------------------------------------

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


def _launches(fn: ast.FunctionDef) -> bool:
    """Whether ``fn`` (nested code included) launches a kernel: ``<name>_kernel[grid](...)``."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript) and isinstance(n.func.value, ast.Name)
               and n.func.value.id.endswith("_kernel") for n in ast.walk(fn))


@pytest.mark.parametrize("path", sorted(KERNELS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_every_launching_function_is_device_guarded(path):
    """Each module-level function of kernels/*.py that launches a kernel runs under
    @on_tensor_device (Triton launches on the current CUDA device, not the tensors')."""
    tree = ast.parse(path.read_text())
    unguarded = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and _launches(f)
                 and "on_tensor_device" not in {ast.unparse(d) for d in f.decorator_list}]
    assert not unguarded, f"{path.name}: launchers without @on_tensor_device: {unguarded}"
    if path.name not in ("__init__.py", "_host.py", "_tuning.py"):
        assert any(isinstance(f, ast.FunctionDef) and _launches(f) for f in tree.body), "the check found no launcher"


class _OnCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device (no GPU here)."""

    index = 1

    @property
    def device(self):
        return torch.device("cuda", self.index)


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(dev):
        entered.append(torch.device(dev).index)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    calls = []
    launcher = on_tensor_device(lambda *args, **kwargs: calls.append((len(entered), args, kwargs)) or "out")
    x = torch.Tensor._make_subclass(_OnCuda, torch.zeros(2))
    assert launcher(3, x, flag=True) == "out"  # the first tensor argument decides
    assert entered == [1] and calls[-1] == (1, (3, x), {"flag": True})
    launcher(7, device=torch.device("cuda", 2))  # a torch.device argument (sketch_omega)
    assert entered == [1, 2]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launcher(x)  # already current: no context
    assert entered == [1, 2]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("CPU tensors must not query CUDA"))
    launcher(torch.zeros(2), 5)
    launcher(5)
    assert entered == [1, 2] and len(calls) == 5
