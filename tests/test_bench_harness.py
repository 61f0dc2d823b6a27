"""The benchmark harness times, measures peak memory and records ratios and targets."""

import json
import os
import signal

import pytest
import torch

from fastmodels.bench import harness


def _case():
    def setup():
        return {"x": torch.randn(512, 512)}

    def big(inp):  # allocates ~32 MB of temporaries
        return (inp["x"].repeat(4, 4) * 2).sum()

    def small(inp):  # a ~2 MB temporary: small, but above what the peak measurement resolves
        return inp["x"].repeat(2, 1).mul(2).sum() * 8

    ref = lambda inp: (inp["x"].double().sum() * 32)  # noqa: E731
    return harness.Case(
        op="_toy", name="sum", device="cpu", setup=setup,
        impls={"ours": small, "peer": big},
        error=lambda inp, out: abs(float(out) - float(ref(inp))) / abs(float(ref(inp))),
        targets={"mem_ratio:peer": 4.0, "rms_rel_err": 1e-3},
    )


def test_run_case_rows_and_ratios(monkeypatch):
    # the worker processes' exact peaks: in a long-lived process freed heap pages are reused and a
    # small call can read 0 MB (which now gives no ratio at all)
    monkeypatch.setattr(harness, "_EXACT_CPU_PEAKS", True)
    rows = harness.run_case(_case(), cpu_budget_s=0.05)
    ours, peer = rows
    assert ours["primary"] and not peer["primary"]
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["rms_rel_err"] < 1e-3
    # The peer's 32 MB temporary shows up in its peak, ours stays small.
    assert peer["peak_mb"] > 20
    assert ours["peak_mb"] < 10
    assert peer["mem_ratio"] > 4
    assert ours["targets"]["mem_ratio:peer"]["met"]
    assert ours["targets"]["rms_rel_err"]["met"]
    table = harness.format_table(rows)
    assert "_toy/sum" in table and "peer" in table


def test_run_keeps_the_cases_that_match(monkeypatch):
    """``run(match=...)`` (``fastmodels bench --case TEXT``) runs only the cases whose name holds
    TEXT."""
    import dataclasses

    toy = [_case(), dataclasses.replace(_case(), name="other sum")]
    monkeypatch.setattr(harness, "_REGISTRY", {"_toy": [lambda device, quick: toy]})
    monkeypatch.setattr(harness, "load_case_modules", lambda: None)
    monkeypatch.setattr(harness, "run_case_measured", lambda case, **kw: harness.run_case(case, measure_memory=False, cpu_budget_s=0.01))
    rows = harness.run("cpu", ["_toy"], write=False, progress=False, match="other")
    assert {r["case"] for r in rows} == {"other sum"} and len(rows) == 2
    assert {r["case"] for r in harness.run("cpu", ["_toy"], write=False, progress=False)} == {"sum", "other sum"}


def test_no_memory_ratio_below_resolution():
    """A peak of 0 MB (below what a high-water mark resolves) gives no ratio, so a memory target
    reads "not measured" instead of met by a division by almost nothing."""
    case = _case()
    rows = [{"impl": "ours", "primary": True, "median_ms": 1.0, "peak_mb": 0.0, "rms_rel_err": 0.0},
            {"impl": "peer", "primary": False, "median_ms": 2.0, "peak_mb": 350.0}]
    harness.finish_rows(case, rows)
    assert "mem_ratio" not in rows[1] and rows[1]["time_ratio"] == 2.0
    assert rows[0]["targets"]["mem_ratio:peer"]["met"] is None


def test_failures_are_recorded_not_raised():
    case = _case()
    case.impls = {"ours": case.impls["ours"], "broken": lambda inp: 1 / 0}
    rows = harness.run_case(case, cpu_budget_s=0.05)
    assert "ZeroDivisionError" in rows[1]["error"]
    assert "FAILED" in harness.format_table(rows)


def test_sigterm_writes_the_implementations_already_measured():
    """A case stopped by SIGTERM (the GPU check's per-op time limit) still writes the rows it has,
    with ratios and targets computed on them and a cut_off note, then exits with 124."""
    case = _case()
    case.impls = {"ours": case.impls["ours"], "peer": case.impls["peer"], "never": lambda inp: 0}
    case_rows = [{"op": "_toy", "case": "sum", "impl": "ours", "primary": True, "median_ms": 2.0},
                 {"op": "_toy", "case": "sum", "impl": "peer", "primary": False, "median_ms": 6.0}]
    emitted = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        with harness._flush_on_sigterm(case, case_rows, emitted.extend):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert stop.value.code == 124
    assert [r["impl"] for r in emitted] == ["ours", "peer"]
    assert emitted[1]["time_ratio"] == 3.0
    assert "not run: ['never']" in emitted[0]["cut_off"]
    assert "rms_rel_err" in emitted[0]["targets"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the case


def test_environment_fields():
    env = harness.environment("cpu")
    for key in ("device_name", "torch", "triton", "commit", "date"):
        assert key in env
    json.dumps(env)


def test_report_takes_latest_run(tmp_path):
    from fastmodels.bench import report

    rows = harness.run_case(_case(), cpu_budget_s=0.02)
    path = tmp_path / "cpu.jsonl"
    with open(path, "w") as f:
        for date in ("2026-01-01", "2026-02-01"):
            for r in rows:
                f.write(json.dumps({**r, "date": date, "device_name": "test cpu"}) + "\n")
    latest = report.latest_rows(path)
    assert len(latest) == len(rows) and {r["date"] for r in latest} == {"2026-02-01"}
    text = report.markdown(latest)
    assert "| _toy / sum | ours |" in text and "test cpu" in text


def test_run_case_measured_reports_peaks_from_a_worker():
    """`fastmodels demo` measures through run_case_measured: on CPU each case runs in a fresh worker
    process, where resident high-water marks are clean, so every implementation gets a peak and
    the PyTorch reference's temporaries show against the fused kernel's."""
    case = harness.collect_cases("cpu", ["electric_image"], quick=True)[0]
    rows = harness.run_case_measured(case, quick=True, cpu_budget_s=0.05)
    assert all("error" not in r for r in rows), rows
    by_impl = {r["impl"]: r for r in rows}
    assert all(r["peak_mb"] is not None for r in rows)
    assert by_impl["torch_reference"]["peak_mb"] > 5 * max(by_impl["cpu"]["peak_mb"], 0.5)
