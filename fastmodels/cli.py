"""Command line: ``fastmodels {info, bench, demo, reproduce}`` (also ``python -m fastmodels``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def _info(args) -> int:
    import torch

    import fastmodels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from fastmodels._dispatch import _cpp_extension_error, cpp_simd_target, nvcc_path, triton_interpreter_enabled

    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    simd, cpp_error = cpp_simd_target(), _cpp_extension_error()
    cpp = cpp_error or f"built, hot loops run {simd or 'unreported'} code"
    report = {d: fastmodels.backends(d) for d in devices}
    if args.json:  # JSON only, so the output pipes into a JSON reader
        facts = {"fastmodels": fastmodels.__version__, "python": platform.python_version(), "torch": torch.__version__,
                 "triton": triton_version, "cuda_device": torch.cuda.get_device_name() if cuda else None,
                 "triton_interpret": triton_interpreter_enabled(), "nvcc": nvcc_path(), "cpu_threads": torch.get_num_threads(),
                 "cpp_simd_target": simd}
        print(json.dumps({**facts, "backends": report}, indent=2))
        return 0
    print(f"fastmodels {fastmodels.__version__}  python {platform.python_version()}  torch {torch.__version__}  triton {triton_version}")
    print(f"CUDA visible: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"TRITON_INTERPRET: {'on' if triton_interpreter_enabled() else 'off'}   nvcc: {nvcc_path() or 'not found'}   CPU threads: {torch.get_num_threads()}")
    print(f"C++ extension (cpu backends): {cpp}")
    for d, ops in report.items():
        print(f"\nbackends for {d} tensors:")
        for op, r in ops.items():
            print(f"  {op:<28} default={r['default']:<10} available={', '.join(r['available'])}")
            for b, why in r["unavailable"].items():
                print(f"  {'':<28}   {b}: {why}")
    return 0


def _bench(args) -> int:
    from fastmodels.bench import harness

    argv = list(args.ops) + (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
    if args.no_write:
        argv.append("--no-write")
    if args.budget is not None:
        argv += ["--budget", str(args.budget)]
    if args.case is not None:
        argv += ["--case", args.case]
    return harness.main(argv)


def _progress(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="step", file=sys.stderr)
    except ImportError:
        return items


def _demo(args) -> int:
    """Each available op against its reference and its peer, then every quick reproduction."""
    import torch

    from fastmodels.bench import harness
    from fastmodels.reproduce import reproductions

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastmodels demo --device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    t0 = time.time()
    cases = harness.collect_cases(device, None, quick=True)
    repros = reproductions()
    print(f"fastmodels demo on {harness.device_name(device)}: {len(cases)} op cases, {len(repros)} quick reproductions\n")
    rows, failed = [], False
    for case in _progress(cases, "ops"):
        # peak memory too (a target of several cases): CUDA allocator statistics in process, on
        # CPU a worker process per case (a resident high-water mark is only clean in a fresh one)
        case_rows = harness.run_case_measured(case, quick=True, cpu_budget_s=0.3)
        failed |= "error" in case_rows[0]
        rows.extend(case_rows)
    if rows:
        print(harness.format_table(rows))
    summaries = {}
    out_root = Path(args.out)
    for name in _progress(list(repros), "reproductions") if repros else ():  # no empty progress bar
        rep = repros[name]
        try:
            summaries[name] = rep.run(True, out_root / name)
        except Exception as exc:  # noqa: BLE001 - report and continue with the others
            failed = True
            summaries[name] = {"error": f"{type(exc).__name__}: {exc}"}
    for name, summary in summaries.items():
        print(f"\nreproduction {name} (quick): {json.dumps(summary, default=str)[:600]}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s" + ("; some steps FAILED" if failed else ""))
    return 1 if failed else 0


def _reproduce(args) -> int:
    from fastmodels.reproduce import reproductions

    repros = reproductions()
    if args.name not in repros:
        known = ", ".join(repros) or "none registered yet"
        print(f"unknown reproduction {args.name!r}; available: {known}", file=sys.stderr)
        return 2
    summary = repros[args.name].run(args.quick, Path(args.out) / args.name)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmodels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, devices and the backends of every op")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_info)

    p = sub.add_parser("bench", help="run the benchmarks and append results to bench/results")
    p.add_argument("ops", nargs="*")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--budget", type=float, help="CPU seconds of timing per implementation (default 2)")
    p.add_argument("--case", metavar="TEXT", help="only the cases whose name contains TEXT")
    p.set_defaults(fn=_bench)

    p = sub.add_parser("demo", help="every op vs its reference and peer, then the quick reproductions")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("reproduce", help="run a paper reproduction")
    p.add_argument("name")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs")
    p.set_defaults(fn=_reproduce)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
