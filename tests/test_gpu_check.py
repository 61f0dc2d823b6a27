"""bench/gpu_check.sh, the one prepared GPU run, walked through on the CPU.

A lent GPU session is rare and short, and the script has changed since it last ran on one, so a
shell error there (an unbound variable under ``set -u``, a renamed test in its priority list, a
summary that does not parse) would cost a whole session. Here the script runs for real with
stand-ins for what needs a GPU: ``nvidia-smi`` and a Python shim (``PYTHON``) that logs each call,
answers the CUDA check with yes, returns at once for pip, the benchmarks and the profiles, and
writes a JUnit file for each pytest phase. The summary step runs on the real interpreter. The test
checks the calls in order, the files returned, and the summary row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")

SHIM = r'''#!@PYTHON@
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
real = @PYTHON_REPR@
if args[:1] == ["-c"]:
    if "cuda.is_available" in args[1]:
        sys.exit(0)  # the script's check for a GPU
    sys.exit(subprocess.call([real, *args]))
if args[:1] == ["-"]:  # the summary script on stdin: the real interpreter
    sys.exit(subprocess.call([real, *args]))
if args[:2] == ["-m", "pytest"]:
    xml = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
    phase = os.path.basename(xml)[len("gpu_tests_"):-len(".xml")]
    if os.environ.get("FAKE_CUTOFF"):  # killed at its limit: per-test lines and the -rfE summary, no JUnit file
        print(f"[gw0] [ 10%] PASSED tests/test_a.py::test_one\n[gw1] [ 20%] FAILED tests/test_a.py::test_two_{phase}\n"
              f"[gw0] [ 30%] SKIPPED tests/test_a.py::test_three\nFAILED tests/test_a.py::test_two_{phase} - AssertionError: off")
        sys.exit(124)
    failing = f"tests.test_fake::test_fails_in_{phase}"
    with open(xml, "w") as f:
        f.write('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" '
                'skipped="1" time="1.5"><testcase classname="tests.test_fake" name="test_ok"/>'
                f'<testcase classname="tests.test_fake" name="test_fails_in_{phase}"><failure message="boom {phase}"/></testcase>'
                '<testcase classname="tests.test_fake" name="test_skip"><skipped/></testcase></testsuite></testsuites>')
    print(f"FAILED {failing} - boom {phase}")
    sys.exit(1)
sys.exit(0)  # pip, fastmodels info, the benchmarks, the report, the profiles
'''


def _run(tmp_path: Path, **env_extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "fakepy"
    shim.write_text(SHIM.replace("@PYTHON_REPR@", repr(sys.executable)).replace("@PYTHON@", sys.executable))
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Fake GPU, 80 GiB, 0.0, 1980 MHz, 1980 MHz'\n")
    for f in (shim, smi):
        f.chmod(f.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    results, log = tmp_path / "results", tmp_path / "calls.jsonl"
    env = dict(os.environ, PYTHON=str(shim), FAKE_LOG=str(log), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FASTMODELS_COMMIT="0123456789ab", **env_extra)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(SCRIPT), str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return res, results, calls


def test_gpu_check_runs_every_step(tmp_path):
    res, results, calls = _run(tmp_path, GPU_CHECK_TEST_TIMEOUT="20")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "gpu_check finished" in res.stdout, out[-3000:]
    assert "unbound variable" not in out and "syntax error" not in out, out[-3000:]

    # the pushdown dq probe before the benchmarks
    probe = ["-m", "fastmodels.bench.pushdown_dq_probe"]
    assert probe in calls and calls.index(probe) < min(i for i, c in enumerate(calls) if c[:2] == ["-m", "fastmodels.bench.harness"])

    # benchmarks: every op, on cuda, in the script's priority order
    benched = [c[2] for c in calls if c[:2] == ["-m", "fastmodels.bench.harness"]]
    assert benched == ["electric_image", "linear_cross_entropy_kl", "randomized_svd", "pushdown_attention"]
    assert all(c[-2:] == ["--device", "cuda"] for c in calls if c[:2] == ["-m", "fastmodels.bench.harness"])
    assert ["-m", "fastmodels.bench.report", "--device", "cuda", "--results", str(results)] in calls
    profiles = [c for c in calls if c[:2] == ["-m", "fastmodels.bench.gpu_profile"]]
    assert profiles == [["-m", "fastmodels.bench.gpu_profile", "electric_image", "pushdown_attention", "randomized_svd", "small_svd"]]

    # tests: two phases, the GPU markers, one autotune config
    runs = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(runs) == 2
    for run in runs:
        assert run[run.index("-m", 2) + 1] == "(triton or gpu) and not slow"
    priority, rest = runs
    nodes = [a for a in priority if "::" in a]
    assert nodes, priority
    for node in nodes:  # a renamed test would make the whole phase an error on the GPU machine
        path, name = node.split("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), f"{node}: no such test"
        assert ["--deselect", node] == rest[rest.index(node) - 1 : rest.index(node) + 1]
    for f in ("tests/test_efield.py", "tests/test_rsvd.py"):
        assert f in priority and rest[rest.index(f) - 1] == "--ignore"

    # what comes back: the device tool returns at most 8 files
    returned = sorted(p.name for p in results.iterdir())
    assert len(returned) <= 8, returned
    assert {"info.log", "bench.log", "gpu_tests.log", "gpu_tests.jsonl"} <= set(returned), returned
    rows = [json.loads(line) for line in (results / "gpu_tests.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["kind"] == "gpu_tests" and row["device"] == "cuda" and row["commit"] == "0123456789ab"
    assert set(row["phases"]) == {"priority", "rest"}
    for phase, ph in row["phases"].items():
        assert (ph["tests"], ph["failures"], ph["skipped"], ph["exit_code"]) == (3, 1, 1, 1)
        assert row["failure_messages"][f"tests.test_fake::test_fails_in_{phase}"] == f"boom {phase}"
    assert row["failed_tests"] == ["tests.test_fake::test_fails_in_priority", "tests.test_fake::test_fails_in_rest"]
    assert row["exit_code"] == 1


def test_gpu_check_knobs(tmp_path):
    """GPU_CHECK_OPS, GPU_CHECK_PROFILE=0 and GPU_CHECK_TEST_FILES narrow the run as documented."""
    res, results, calls = _run(tmp_path, GPU_CHECK_OPS="pushdown_attention", GPU_CHECK_PROFILE="0",
                               GPU_CHECK_TEST_FILES="tests/test_pushdown_kernels.py", GPU_CHECK_TEST_TIMEOUT="20")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert [c[2] for c in calls if c[:2] == ["-m", "fastmodels.bench.harness"]] == ["pushdown_attention"]
    assert not [c for c in calls if c[:2] == ["-m", "fastmodels.bench.gpu_profile"]]
    runs = [c for c in calls if c[:2] == ["-m", "pytest"]]
    assert len(runs) == 1 and runs[0][-1] == "tests/test_pushdown_kernels.py"
    row = json.loads((results / "gpu_tests.jsonl").read_text())
    assert set(row["phases"]) == {"all"}


def test_gpu_check_refuses_without_cuda(tmp_path):
    """With no CUDA device (the real interpreter, on this CPU) it stops before installing anything."""
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("a GPU machine")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "r")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if res.returncode == 0:
        pytest.skip("torch sees a CUDA device")
    assert res.returncode == 2 and "torch sees no CUDA device" in res.stderr


def test_gpu_check_summary_of_a_cut_off_phase(tmp_path):
    """A phase killed by its time limit leaves no JUnit file: the summary counts the per-test lines
    and takes the failure messages from pytest's short summary."""
    res, results, _ = _run(tmp_path, FAKE_CUTOFF="1", GPU_CHECK_OPS="electric_image", GPU_CHECK_PROFILE="0", GPU_CHECK_TEST_TIMEOUT="20")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    row = json.loads((results / "gpu_tests.jsonl").read_text())
    for phase, ph in row["phases"].items():
        assert (ph["passed_before_cutoff"], ph["failed_before_cutoff"], ph["skipped_before_cutoff"]) == (1, 1, 1)
        assert ph["exit_code"] == 124 and "cut off by the time limit: True" in ph["note"]
        assert row["failure_messages"][f"tests/test_a.py::test_two_{phase}"] == "AssertionError: off"
    assert row["failed_tests"] == ["tests/test_a.py::test_two_priority", "tests/test_a.py::test_two_rest"]
    assert row["exit_code"] == 124
