"""Benchmark harness: a registry of op cases, timers, peak-memory probes, JSON-lines results.

A *case* is one op at one shape on one device with several implementations: ours (the first
entry, the *primary*) and the peers it is measured against. Every implementation of a case runs
in the same process on the same inputs. For each one the harness records

* the median and the 20%/80% quantiles of its time (``triton.testing.do_bench`` with CUDA events
  on GPU; a warm repeat-and-median ``perf_counter`` timer on CPU),
* its peak memory above what the inputs already hold (CUDA allocator stats on GPU; on CPU the
  process's resident high-water mark, reset through ``/proc/self/clear_refs``, with each case run
  in a fresh subprocess so that nothing else pollutes it),
* its error metric against the case's reference (a speed-up for a wrong answer is worthless),
* its time and peak-memory ratios to the primary, and throughput if the case declares FLOPs/bytes.

Results are appended as JSON lines to ``bench/results/<device>.jsonl`` with the device name,
torch/triton versions, git commit and date, and printed as a table.

Op modules register cases with ``@register_cases("op_name")`` on a function
``(device: str, quick: bool) -> list[Case]``; they live in ``bench/bench_<op>.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import pkgutil
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fastmodels._dispatch import cpp_simd_target


def _default_results_dir() -> Path:
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").exists():  # a source checkout or an editable install
        return here / "results"
    return Path.cwd() / "fastmodels-bench-results"  # an installed wheel: never write into site-packages


RESULTS_DIR = Path(os.environ.get("FASTMODELS_BENCH_RESULTS") or _default_results_dir())


@dataclass
class Case:
    """One benchmark case. ``impls`` maps a label to ``fn(inputs) -> output``; the first is ours."""

    op: str
    name: str
    device: str
    setup: Callable[[], dict]
    impls: dict[str, Callable[[dict], Any]]
    # (inputs, output) -> error metric (lower is better), or a dict holding error_name and extra metrics
    error: Callable[[dict, Any], float | dict] | None = None
    error_name: str = "rms_rel_err"
    flops: Callable[[dict], float] | None = None
    bytes: Callable[[dict], float] | None = None
    targets: dict[str, float] = field(default_factory=dict)  # e.g. {"speedup:sdpa": 1/1.5}
    quick: bool = False
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"


def with_env(name: str, value: str, fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """``fn`` run with environment variable ``name`` set to ``value`` (restored afterwards): an
    implementation variant chosen by a runtime switch, timed in the same case as the default."""

    def run(x: dict) -> Any:
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(x)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return run


_REGISTRY: dict[str, list[Callable[[str, bool], list[Case]]]] = {}


def register_cases(op: str):
    def deco(fn):
        _REGISTRY.setdefault(op, []).append(fn)
        return fn

    return deco


def load_case_modules() -> None:
    pkg = importlib.import_module(__package__ or "fastmodels.bench")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("bench_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def collect_cases(device: str, ops: list[str] | None = None, quick: bool = False) -> list[Case]:
    load_case_modules()
    cases = []
    for op, fns in sorted(_REGISTRY.items()):
        if ops and op not in ops:
            continue
        for fn in fns:
            cases.extend(c for c in fn(device, quick) if (c.quick or not quick))
    return cases


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu(fn: Callable[[], Any], *, budget_s: float = 2.0, min_reps: int = 5, max_reps: int = 200) -> list[float]:
    """Times in ms of repeated warm calls (the caller warms up first)."""
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _event_times(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return times


def time_cuda(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100, slow_ms: float = 50) -> tuple[float, float, float]:
    """(median, p20, p80) in ms. Calls slower than ``slow_ms`` (looped peers, big factorizations)
    are timed over 6 calls with CUDA events (3 above 20 x ``slow_ms``): do_bench would spend ~10
    calls on them."""
    first = _event_times(fn, 1)[0]
    if first > slow_ms:
        times = sorted(_event_times(fn, 5 if first < 20 * slow_ms else 2) + [first])
        return statistics.median(times), times[len(times) // 5], times[-1 - len(times) // 5]
    try:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    except ImportError:
        times = _event_times(fn, 50)
        q = statistics.quantiles(times, n=10)
        return statistics.median(times), q[1], q[7]


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


_EXACT_CPU_PEAKS = False  # set in the per-case worker processes


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def set_mmap_threshold(threshold: int) -> None:
    """glibc's M_MMAP_THRESHOLD: allocations above it are mmapped and unmapped on free."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def _peak_cpu_mb_exact(fn: Callable[[], Any]) -> float | None:
    """Resident peaks that mean something. With glibc's dynamic mmap threshold, memory freed by a
    warm-up call stays resident in the heap and later calls reuse it (every implementation then
    reads ~0 MB). So the probe first returns free heap pages to the OS (malloc_trim) and maps every
    block above 64 KiB fresh: the high-water mark then counts what one call really touches. Fresh
    mmaps page-fault on every allocation, so timing runs afterwards with a 32 MiB threshold
    (glibc's dynamic maximum, its warmed-up state)."""
    libc = _libc()
    set_mmap_threshold(64 * 1024)
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        return peak_cpu_mb(fn)
    finally:
        set_mmap_threshold(32 * 1024 * 1024)


def peak_cpu_mb(fn: Callable[[], Any]) -> float | None:
    """Resident-memory high-water mark of one call above the resident size before it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    out = fn()
    peak = _rss_kb("VmHWM")
    del out
    return max(peak - before, 0) / 1024


def peak_cuda_mb(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


# ---------------------------------------------------------------------------------------------
# Environment facts
# ---------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device visible"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parent.parent
    commit, dirty = os.environ.get("FASTMODELS_COMMIT"), None  # set where the tree has no .git (GPU machine)
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip() or None
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "cpp_simd_target": cpp_simd_target() if device == "cpu" else None,
    }


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------


def run_case(case: Case, *, measure_memory: bool = True, cpu_budget_s: float = 2.0, rows: list | None = None) -> list[dict]:
    """Run every implementation of ``case`` on the same inputs; return one row per implementation.

    ``rows``: a list to fill as implementations finish, so a caller that is stopped part-way (the
    GPU check's time limits) can still write what was measured (see ``finish_rows``)."""
    torch.manual_seed(0)
    inputs = case.setup()
    rows = [] if rows is None else rows
    for label, impl in case.impls.items():
        # threads as set by the case's setup (e.g. a one-thread case in its worker process)
        row: dict[str, Any] = {"op": case.op, "case": case.name, "impl": label, "primary": not rows, "threads": torch.get_num_threads()}
        fn = lambda: impl(inputs)  # noqa: E731
        try:
            out = fn()  # warm-up: compilation, autotuning, lazy initialisation
            _sync(case.device)
            if case.error is not None:
                err = case.error(inputs, out)
                if isinstance(err, dict):  # {error_name: headline value, other metrics...}
                    row.update({name: float(value) for name, value in err.items()})
                else:
                    row[case.error_name] = float(err)
            del out
            if measure_memory:
                if case.device == "cuda":
                    row["peak_mb"] = peak_cuda_mb(fn)
                else:
                    row["peak_mb"] = _peak_cpu_mb_exact(fn) if _EXACT_CPU_PEAKS else peak_cpu_mb(fn)
            if case.device == "cuda":
                med, p20, p80 = time_cuda(fn)
            else:
                times = time_cpu(fn, budget_s=cpu_budget_s)
                q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
                med, p20, p80 = statistics.median(times), q[0], q[3]
                row["reps"] = len(times)
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
            if case.flops is not None:
                row["tflops"] = case.flops(inputs) / (med * 1e-3) / 1e12
            if case.bytes is not None:
                row["gbps"] = case.bytes(inputs) / (med * 1e-3) / 1e9
        except torch.cuda.OutOfMemoryError as exc:  # a peer running out of memory is a result
            row["error"] = f"OOM: {str(exc).splitlines()[0]}"
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        gc.collect()
    return finish_rows(case, rows)


_MIN_PEAK_MB = 0.1  # peaks below this are not resolved (no memory ratio)


def finish_rows(case: Case, rows: list[dict]) -> list[dict]:
    """Ratios to the primary, the case's targets and note, on the rows measured (all of them, or
    the first few when a run was cut off)."""
    if not rows:
        return rows
    primary = rows[0]
    for row in rows:
        if "median_ms" in row and "median_ms" in primary:
            row["time_ratio"] = row["median_ms"] / primary["median_ms"]  # > 1: ours is faster
        # > 1: ours uses less. No ratio when a peak is below what the measurement resolves (CPU
        # high-water marks move in pages; a 0 would turn the ratio into a huge number).
        if (row.get("peak_mb") or 0) >= _MIN_PEAK_MB and (primary.get("peak_mb") or 0) >= _MIN_PEAK_MB:
            row["mem_ratio"] = row["peak_mb"] / primary["peak_mb"]
    for target, value in case.targets.items():
        # "time_ratio:<impl>" >= value, "mem_ratio:<impl>" >= value, "<metric>" <= value for primary
        kind, _, impl = target.partition(":")
        row = next((r for r in rows if r["impl"] == impl), None) if impl else primary
        got = None if row is None else row.get(kind)
        # None: not measured in this run (e.g. memory in the demo, a peer that failed).
        if isinstance(got, float) and math.isnan(got):
            got = None  # e.g. no reference at this size
        ok = None if got is None else bool(got >= value if kind in ("time_ratio", "mem_ratio") else got <= value)
        primary.setdefault("targets", {})[target] = {"want": value, "got": got, "met": ok}
    for row in rows:
        if case.note:
            row["note"] = case.note
    return rows


def _run_case_subprocess(device: str, op: str, index: int, quick: bool, budget: float) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [sys.executable, "-m", "fastmodels.bench.harness", "--worker", op, str(index), "--device", device, "--out", path, "--budget", str(budget)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return [{"op": op, "case": f"#{index}", "impl": "?", "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}]
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def run_case_measured(case: Case, *, quick: bool, cpu_budget_s: float = 2.0) -> list[dict]:
    """``run_case`` with peak memory: in this process on CUDA (allocator statistics), in a fresh
    worker process on CPU (resident high-water marks). ``case`` must come from collect_cases with
    the same ``quick``."""
    if case.device != "cpu":
        return run_case(case, cpu_budget_s=cpu_budget_s)
    index = [c.key for c in collect_cases(case.device, [case.op], quick)].index(case.key)
    return _run_case_subprocess(case.device, case.op, index, quick, cpu_budget_s)


def run(device: str, ops: list[str] | None = None, quick: bool = False, *, write: bool = True, progress: bool = True, cpu_budget_s: float = 2.0, match: str | None = None) -> list[dict]:
    cases = [c for c in collect_cases(device, ops, quick) if match is None or match in c.name]
    env = environment(device)
    rows: list[dict] = []
    iterator = cases
    bar = None
    if progress and sys.stderr.isatty():  # no carriage-return bars in log files
        try:
            from tqdm import tqdm

            bar = tqdm(cases, desc=f"bench [{device}]", unit="case", file=sys.stderr)
            iterator = bar
        except ImportError:
            pass
    def emit(case_rows: list[dict]) -> None:
        for row in case_rows:
            for key, value in env.items():
                row.setdefault(key, value)  # a row's own facts (its thread count) win
        rows.extend(case_rows)
        if write:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            with open(RESULTS_DIR / f"{device}.jsonl", "a") as f:
                for row in case_rows:
                    f.write(json.dumps(row, sort_keys=True) + "\n")

    for case in iterator:
        if bar is not None:
            bar.set_postfix_str(case.key[:48])
        if device == "cpu":
            case_rows = run_case_measured(case, quick=quick, cpu_budget_s=cpu_budget_s)
        else:
            case_rows = []
            with _flush_on_sigterm(case, case_rows, emit):
                run_case(case, rows=case_rows)
        emit(case_rows)
        if bar is None and progress:  # one line per finished case for logs
            done = ", ".join(f"{r['impl']} {r['median_ms']:.3f} ms" if "median_ms" in r else f"{r['impl']} {r.get('error', '?')[:60]}" for r in case_rows)
            print(f"[bench] {case.key}: {done}", file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def _flush_on_sigterm(case: Case, case_rows: list[dict], emit: Callable[[list[dict]], None]):
    """While ``case`` runs: on SIGTERM (``timeout``, the GPU check's per-op limits), write the
    implementations it has finished, marked as cut off, then exit with 124."""
    def handler(signum, frame):
        done = [dict(r) for r in case_rows]
        if done:
            finish_rows(case, done)
            skipped = [label for label in case.impls if label not in {r["impl"] for r in done}]
            for row in done:
                row["cut_off"] = f"SIGTERM after {len(done)} of {len(case.impls)} implementations; not run: {skipped}"
            emit(done)
        print(f"[bench] {case.key}: cut off (SIGTERM) after {len(done)} of {len(case.impls)} implementations", file=sys.stderr, flush=True)
        sys.exit(124)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    header = f"{'op / case':<52} {'impl':<26} {'median ms':>10} {'p20-p80':>17} {'peak MB':>9} {'x ours':>7} {'mem x':>7} {'error':>9}"
    lines = [header, "-" * len(header)]
    last = None
    for r in rows:
        key = f"{r['op']}/{r['case']}"
        label = key if key != last else ""
        last = key
        err_keys = [k for k in r if k.endswith("err") or k.endswith("error_ratio")]
        err = r.get(err_keys[0]) if err_keys else None
        if "error" in r and "median_ms" not in r:
            lines.append(f"{label[:52]:<52} {r['impl'][:26]:<26} FAILED: {r['error'][:80]}")
            continue
        q = f"{_fmt(r.get('p20_ms'), '.3g')}-{_fmt(r.get('p80_ms'), '.3g')}"
        lines.append(
            f"{label[:52]:<52} {r['impl'][:26]:<26} {_fmt(r.get('median_ms'), '10.3f')} {q:>17} {_fmt(r.get('peak_mb'), '9.1f')} "
            f"{_fmt(r.get('time_ratio'), '7.2f')} {_fmt(r.get('mem_ratio'), '7.2f')} {_fmt(err, '9.2e')}"
        )
        for target, t in r.get("targets", {}).items():
            verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT MET")
            lines.append(f"{'':<52}   target {target}: want {'>=' if ':' in target else '<='} {t['want']:.3g}, got {_fmt(t['got'], '.3g')} -> {verdict}")
    lines.append("x ours = peer time / our time (>1: fastmodels is faster); mem x = peer peak / our peak.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastmodels bench", description="Run the registered benchmarks.")
    p.add_argument("ops", nargs="*", help="ops to run (default: all)")
    p.add_argument("--quick", action="store_true", help="only the small cases")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible)")
    p.add_argument("--no-write", action="store_true", help="do not append to bench/results")
    p.add_argument("--budget", type=float, default=2.0, help="CPU seconds of timing per implementation")
    p.add_argument("--case", default=None, metavar="TEXT", help="only the cases whose name contains TEXT")
    p.add_argument("--worker", nargs=2, metavar=("OP", "INDEX"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.worker:
        op, index = args.worker[0], int(args.worker[1])
        global _EXACT_CPU_PEAKS
        _EXACT_CPU_PEAKS = device == "cpu"
        case = collect_cases(device, [op], args.quick)[index]
        rows = run_case(case, cpu_budget_s=args.budget)
        with open(args.out, "w") as f:
            json.dump(rows, f)
        return 0
    load_case_modules()
    unknown = set(args.ops) - set(_REGISTRY)
    if unknown:
        p.error(f"unknown op(s) {sorted(unknown)}; registered: {sorted(_REGISTRY)}")
    rows = run(device, args.ops or None, args.quick, write=not args.no_write, cpu_budget_s=args.budget, match=args.case)
    if not rows and args.case is not None:
        p.error(f"--case {args.case!r}: no case of ops {args.ops or 'all'} on {device}{' (--quick)' if args.quick else ''} has it in its name")
    print(format_table(rows))
    return 1 if any("error" in r and r.get("primary") for r in rows) else 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the case modules register into
    # fastmodels.bench.harness's registry.
    from fastmodels.bench import harness as _harness

    sys.exit(_harness.main())
