"""Markdown table of the latest benchmark rows (for README.md).

    python -m fastmodels.bench.report [--device cpu|cuda] [--results DIR]

For every (op, case) it takes the newest run (the rows sharing the newest date) and prints one line
per implementation: median time, peak memory, ratios to ours, error, and whether targets were met.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmodels.bench.harness import RESULTS_DIR


def latest_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "op" in r and "case" in r]
    newest: dict[tuple, str] = {}
    for r in rows:
        key = (r["op"], r["case"])
        newest[key] = max(newest.get(key, ""), r.get("date", ""))
    return [r for r in rows if r.get("date", "") == newest[(r["op"], r["case"])]]


def _num(v, spec):
    return "" if v is None else format(v, spec)


def _verdict(met) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def markdown(rows: list[dict]) -> str:
    out = ["| op / case | impl | median ms | peak MB | peer time / ours | peer mem / ours | error | targets |", "|---|---|---|---|---|---|---|---|"]
    machines = sorted({f"{r.get('device_name')} (torch {r.get('torch')}, triton {r.get('triton')}, commit {r.get('commit')}, {r.get('date', '')[:10]})" for r in rows})
    for r in rows:
        err_keys = [k for k in r if k.endswith("err") or k.endswith("error_ratio")]
        err = f"{err_keys[0]}={r[err_keys[0]]:.2e}" if err_keys and r.get(err_keys[0]) is not None else ""
        targets = "; ".join(f"{k} {_verdict(t['met'])} ({_num(t['got'], '.3g')} vs {t['want']:.3g})" for k, t in r.get("targets", {}).items())
        if "median_ms" not in r:
            out.append(f"| {r['op']} / {r['case']} | {r['impl']} | failed: {r.get('error', '')[:60]} | | | | | |")
            continue
        ratio = "" if r.get("primary") else _num(r.get("time_ratio"), ".2f")
        mem = "" if r.get("primary") else _num(r.get("mem_ratio"), ".2f")
        out.append(f"| {r['op']} / {r['case']} | {r['impl']} | {r['median_ms']:.3f} | {_num(r.get('peak_mb'), '.1f')} | {ratio} | {mem} | {err} | {targets} |")
    return "Machine: " + "; ".join(machines) + "\n\n" + "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmodels.bench.report")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    path = Path(args.results) / f"{args.device}.jsonl"
    if not path.exists():
        print(f"no results at {path}")
        return 1
    print(markdown(latest_rows(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
