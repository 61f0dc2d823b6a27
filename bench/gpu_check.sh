#!/usr/bin/env bash
# The one prepared GPU check: on a bare H100/H200 machine with the packages of
# ../shared/ENVIRONMENT.md (torch, triton, nvcc, pytest, pytest-xdist), install fastmodels, run every
# CUDA benchmark, kernel-time breakdowns and then the GPU test suite, and write machine-readable
# results. About 9.5 minutes at most (the per-op benchmark limits below, 70 s of breakdowns, 80 s of
# tests).
#
#   FASTMODELS_COMMIT=$(git rev-parse --short=12 HEAD) bash bench/gpu_check.sh [results_dir]
#
# Benchmarks come first because they are what the issues' targets are measured by; each op runs
# under its own time limit and every finished case is appended at once, so a slow op loses only
# its own remaining cases. The tests that follow are the ones a CPU cannot run (Triton and CUDA
# backends, marked triton or gpu), with per-test lines (-v) so that a run cut off by its limit still
# says what passed and what failed.
#
# Knobs: GPU_CHECK_OPS (space-separated ops, default all, in priority order), GPU_CHECK_PROFILE=0
# (no kernel-time breakdown), GPU_CHECK_TESTS=0 (no tests), GPU_CHECK_TEST_FILES (pytest node ids,
# default tests), GPU_CHECK_TEST_TIMEOUT (s, default 80), GPU_CHECK_BENCH_TIMEOUT (s, one limit for
# every op instead of the per-op defaults), GPU_CHECK_LIMITS ("op=seconds ..." for some ops),
# FASTMODELS_BUILD_CPP (default 0 here: the GPU check
# runs no cpu backend).
#
# Results: <results_dir>/cuda.jsonl (benchmark rows, appended), profile.jsonl (kernel-time
# breakdowns) and gpu_tests.jsonl (one summary row), plus info.log, bench.log and gpu_tests.log.
# Default results_dir: $OUT when set (the device tool), else bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-bench/results}}"
mkdir -p "$RESULTS"
export FASTMODELS_BENCH_RESULTS="$RESULTS"
export FASTMODELS_CACHE_DIR="${FASTMODELS_CACHE_DIR:-/tmp/fastmodels-cache}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T_TESTS="${GPU_CHECK_TEST_TIMEOUT:-80}"
OPS="${GPU_CHECK_OPS:-pushdown_attention linear_cross_entropy_kl randomized_svd electric_image}"
declare -A T_OP=([pushdown_attention]=160 [linear_cross_entropy_kl]=75 [randomized_svd]=120 [electric_image]=40)
for kv in ${GPU_CHECK_LIMITS:-}; do T_OP[${kv%%=*}]=${kv#*=}; done
start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - start )) s]"; }

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device; run this on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
FASTMODELS_BUILD_CPP="${FASTMODELS_BUILD_CPP:-0}" "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i "warning" | tail -3
if ! "$PY" -c "import fastmodels.kernels, fastmodels.bench.harness" 2>/dev/null; then
  # the editable install failed: expose kernels/ and bench/ under the package by links instead
  echo "gpu_check.sh: pip install -e . failed; linking kernels/ and bench/ into fastmodels/" >&2
  ln -sfn ../kernels fastmodels/kernels && ln -sfn ../bench fastmodels/bench
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m fastmodels info > "$RESULTS/info.log" 2>&1
head -40 "$RESULTS/info.log"
echo "$(elapsed) installed"

echo "=== GPU benchmarks ==="
for op in $OPS; do
  limit="${GPU_CHECK_BENCH_TIMEOUT:-${T_OP[$op]:-60}}"
  echo "--- $op (limit ${limit} s) $(elapsed) ---" | tee -a "$RESULTS/bench.log"
  timeout "$limit" "$PY" -m fastmodels.bench.harness "$op" --device cuda >> "$RESULTS/bench.log" 2>&1
  rc=$?
  echo "exit $rc $(elapsed)" | tee -a "$RESULTS/bench.log"
done
"$PY" -m fastmodels.bench.report --device cuda --results "$RESULTS" 2>&1 | tail -60

if [ "${GPU_CHECK_PROFILE:-1}" != "0" ]; then
  echo "=== kernel-time breakdowns (limit 70 s) $(elapsed) ==="
  prof_ops=$(for op in $OPS; do case $op in pushdown_attention) echo -n "$op ";; randomized_svd) echo -n "small_svd $op ";; esac; done)
  if [ -n "$prof_ops" ]; then
    timeout 70 "$PY" -m fastmodels.bench.gpu_profile $prof_ops > "$RESULTS/profile.log" 2>&1
    echo "exit $? $(elapsed)"; grep -v "^\s*$" "$RESULTS/profile.log"
  fi
fi

if [ "${GPU_CHECK_TESTS:-1}" != "0" ]; then
  echo "=== GPU tests: triton and gpu markers (limit ${T_TESTS} s) $(elapsed) ==="
  per_test=()  # one slow test must not eat the whole budget
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
  # One autotune config per pushdown kernel: the tests check results, the benchmarks tune.
  # SIGINT at the limit: pytest stops and still reports the failures so far
  FASTMODELS_AUTOTUNE=0 timeout -s INT -k 15 "$T_TESTS" "$PY" -m pytest -v -rfE -n 8 -p no:cacheprovider -m "(triton or gpu) and not slow" \
    "${per_test[@]}" --ignore tests/test_triton_compile.py --junitxml="$RESULTS/gpu_tests.xml" ${GPU_CHECK_TEST_FILES:-tests} \
    > "$RESULTS/gpu_tests.log" 2>&1
  test_rc=$?
  grep -E "FAILED|ERROR|passed|failed" "$RESULTS/gpu_tests.log" | grep -v " PASSED " | tail -40
  "$PY" - "$RESULTS" "$test_rc" <<'PYEOF'
import json, re, sys, xml.etree.ElementTree as ET
from fastmodels.bench.harness import environment
results, rc = sys.argv[1], int(sys.argv[2])
row = {"kind": "gpu_tests", "exit_code": rc, "selection": "-m '(triton or gpu) and not slow'", **environment("cuda")}
try:
    suite = ET.parse(f"{results}/gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    for k in ("tests", "failures", "errors", "skipped", "time"):
        row[k] = float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0))
    failed = [(f"{c.get('classname')}::{c.get('name')}", c.find("failure") if c.find("failure") is not None else c.find("error"))
              for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    row["failed_tests"] = [name for name, _ in failed][:50]
    row["failure_messages"] = {name: (el.get("message") or "")[:300] for name, el in failed[:50]}
except (OSError, ET.ParseError) as exc:  # cut off by its limit: count the per-test lines instead
    log = open(f"{results}/gpu_tests.log").read()
    for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
        row[word.lower() + "_before_cutoff"] = len(re.findall(rf"\] {word} ", log))
    row["failed_tests"] = re.findall(r"\] (?:FAILED|ERROR) (\S+)", log)[:50]
    # -rfE: the short summary that pytest still prints after SIGINT ("FAILED node - message")
    row["failure_messages"] = {m[0]: m[1][:300] for m in re.findall(r"^(?:FAILED|ERROR) (\S+) - (.*)$", log, re.M)[:50]}
    row["note"] = f"no junit xml (cut off by the time limit: {rc == 124}): {exc}"
with open(f"{results}/gpu_tests.jsonl", "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
print(json.dumps({k: v for k, v in row.items() if k in ("tests", "failures", "errors", "skipped", "time", "exit_code") or k.endswith("cutoff")}))
PYEOF
fi
rm -f "$RESULTS/gpu_tests.xml"  # the device tool returns at most 8 files
echo "gpu_check finished in $(( $(date +%s) - start )) s; results in $RESULTS"
