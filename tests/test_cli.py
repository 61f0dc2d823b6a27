"""The command line: info reports backends; unknown names fail cleanly."""

import json
import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastmodels", *args], capture_output=True, text=True, timeout=timeout)


def test_info_json_lists_every_op():
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    report = json.loads(text[text.index("{"):])
    assert "cpu" in report
    for op, entry in report["cpu"].items():
        assert entry["default"] in entry["available"], op


def test_reproduce_unknown_name():
    out = _run("reproduce", "no-such-experiment")
    assert out.returncode == 2
    assert "unknown reproduction" in out.stderr


def test_bench_unknown_op():
    out = _run("bench", "no_such_op", "--no-write")
    assert out.returncode != 0
    assert "unknown op" in out.stderr
