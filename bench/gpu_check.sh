#!/usr/bin/env bash
# The one prepared GPU check: on a bare H100/H200 machine with the packages of
# ../shared/ENVIRONMENT.md (torch, triton, nvcc, pytest, pytest-xdist), install fastmodels, run the
# GPU test suite and every CUDA benchmark, and write machine-readable results. At most ~7.5 minutes
# (tests 180 s, then 60 s per op's benchmarks; both limits adjustable, see README).
#
#   FASTMODELS_COMMIT=$(git rev-parse --short=12 HEAD) bash bench/gpu_check.sh [results_dir]
#
# Results: <results_dir>/cuda.jsonl (benchmark rows, appended) and gpu_tests.jsonl (one summary row),
# plus info.log, gpu_tests.log and bench.log. Default results_dir: $OUT when set (the device tool), else bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-bench/results}}"
mkdir -p "$RESULTS"
export FASTMODELS_BENCH_RESULTS="$RESULTS"
export FASTMODELS_CACHE_DIR="${FASTMODELS_CACHE_DIR:-/tmp/fastmodels-cache}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T_TESTS="${GPU_CHECK_TEST_TIMEOUT:-180}"
T_BENCH_OP="${GPU_CHECK_BENCH_TIMEOUT:-60}"
start=$(date +%s)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device; run this on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i "warning" | tail -3
"$PY" -m fastmodels info 2>&1 | tee "$RESULTS/info.log" | head -40

echo "=== GPU tests (timeout ${T_TESTS}s) ==="
per_test=()  # one slow test must not eat the whole budget
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
timeout "$T_TESTS" "$PY" -m pytest -q -n 8 -p no:cacheprovider -m "not slow" "${per_test[@]}" --junitxml="$RESULTS/gpu_tests.xml" tests \
  > "$RESULTS/gpu_tests.log" 2>&1
test_rc=$?
tail -25 "$RESULTS/gpu_tests.log"
"$PY" - "$RESULTS" "$test_rc" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from fastmodels.bench.harness import environment
results, rc = sys.argv[1], int(sys.argv[2])
row = {"kind": "gpu_tests", "exit_code": rc, **environment("cuda")}
try:
    suite = ET.parse(f"{results}/gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    for k in ("tests", "failures", "errors", "skipped", "time"):
        row[k] = float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0))
    row["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                           if c.find("failure") is not None or c.find("error") is not None][:50]
except (OSError, ET.ParseError) as exc:
    row["note"] = f"no junit xml (timeout {rc == 124}): {exc}"
with open(f"{results}/gpu_tests.jsonl", "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
print(json.dumps({k: row.get(k) for k in ("tests", "failures", "errors", "skipped", "time", "exit_code")}))
PYEOF

echo "=== GPU benchmarks (timeout ${T_BENCH_OP}s per op) ==="
ops=$("$PY" -c "from fastmodels.bench import harness; harness.load_case_modules(); print(' '.join(sorted(harness._REGISTRY)))")
for op in $ops; do
  echo "--- $op ---"
  timeout "$T_BENCH_OP" "$PY" -m fastmodels.bench.harness "$op" --device cuda > "$RESULTS/bench_op.log" 2>&1
  echo "exit $?"; cat "$RESULTS/bench_op.log" >> "$RESULTS/bench.log"; grep -v "it/s\]" "$RESULTS/bench_op.log" | tail -30
done
rm -f "$RESULTS/bench_op.log" "$RESULTS/gpu_tests.xml"  # the device tool returns at most 8 files
echo "gpu_check finished in $(( $(date +%s) - start )) s; results in $RESULTS"
