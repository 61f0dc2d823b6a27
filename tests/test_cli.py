"""The command line: info reports backends; unknown names fail cleanly."""

import json
import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastmodels", *args], capture_output=True, text=True, timeout=timeout)


def test_info_json_lists_every_op():
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)  # nothing but the JSON document
    assert info["torch"] and "cpu" in info["backends"]
    for op, entry in info["backends"]["cpu"].items():
        assert entry["default"] in entry["available"], op
    try:
        from fastmodels import _C
    except ImportError:
        assert info["cpp_simd_target"] is None
    else:
        assert info["cpp_simd_target"] == _C.simd_target()


def test_demo_on_a_missing_gpu_is_a_clean_error():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = _run("demo", "--device", "cuda")
    assert out.returncode == 2 and "no CUDA device is visible" in out.stderr and "Traceback" not in out.stderr


def test_reproduce_unknown_name():
    out = _run("reproduce", "no-such-experiment")
    assert out.returncode == 2
    assert "unknown reproduction" in out.stderr


def test_bench_unknown_op():
    out = _run("bench", "no_such_op", "--no-write")
    assert out.returncode != 0
    assert "unknown op" in out.stderr


def test_bench_case_that_matches_nothing():
    out = _run("bench", "electric_image", "--device", "cpu", "--case", "no such case", "--no-write")
    assert out.returncode == 2 and "--case 'no such case': no case of ops ['electric_image'] on cpu" in out.stderr
