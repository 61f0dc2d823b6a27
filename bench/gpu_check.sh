#!/usr/bin/env bash
# The one prepared GPU check: on a bare H100/H200 machine with the packages of
# ../shared/ENVIRONMENT.md (torch, triton, nvcc, pytest, pytest-xdist), install fastmodels, run every
# CUDA benchmark, kernel-time breakdowns and then the GPU test suite, and write machine-readable
# results. About 9.3 minutes at most (476 s in the run at d5741f9, before the probe): the per-op
# benchmark limits below (335 s), the 45 s pushdown dq probe, 60 s of breakdowns, 80 s of tests,
# the install, and at most 10-15 s of kill grace per step that overruns, so a run stays inside the
# device tool's 600 s per command.
#
#   FASTMODELS_COMMIT=$(git rev-parse --short=12 HEAD) bash bench/gpu_check.sh [results_dir]
#
# Benchmarks come first because they are what the issues' targets are measured by; each op runs
# under its own time limit (the ops closest to their targets first) and every finished case is
# appended at once; a case cut off by its limit still writes the implementations it finished
# (marked cut_off), so a slow op loses only what it did not reach. The tests that follow are the
# ones a CPU cannot run (Triton and CUDA backends, marked triton or gpu), in two phases: first the
# CUDA C++ backends and the kernels changed since the last GPU run (PRIORITY below, 55% of the
# limit), then the rest; per-test lines (-v) and pytest's failure summary (-rfE) mean a run cut off
# by its limit still says what passed and what failed, and why.
#
# Knobs: GPU_CHECK_OPS (space-separated ops, default all, in priority order), GPU_CHECK_PROFILE=0
# (no kernel-time breakdown), GPU_CHECK_PROBE=0 (no pushdown dq probe, bench/pushdown_dq_probe.py), GPU_CHECK_TESTS=0 (no tests), GPU_CHECK_TEST_FILES (pytest node ids,
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
OPS="${GPU_CHECK_OPS:-electric_image linear_cross_entropy_kl randomized_svd pushdown_attention}"
declare -A T_OP=([pushdown_attention]=125 [linear_cross_entropy_kl]=70 [randomized_svd]=100 [electric_image]=40)
for kv in ${GPU_CHECK_LIMITS:-}; do T_OP[${kv%%=*}]=${kv#*=}; done
start=$(date +%s)
# per-phase test logs and junit files stay out of $RESULTS (the device tool returns at most 8 files:
# $RESULTS holds cuda.jsonl, profile.jsonl, gpu_tests.jsonl and four logs, even when cut off)
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
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

if [ "${GPU_CHECK_PROBE:-1}" != "0" ] && [[ " $OPS " == *" pushdown_attention "* ]]; then
  # the pushdown dq fault of the d5741f9 run (README, Known issue): one case per suspect, ~30 s
  echo "=== pushdown dq probe (limit 45 s) $(elapsed) ==="
  timeout -k 10 45 "$PY" -m fastmodels.bench.pushdown_dq_probe > "$SCRATCH/probe.log" 2>&1
  echo "exit $? $(elapsed)" >> "$SCRATCH/probe.log"
  tee -a "$RESULTS/bench.log" < "$SCRATCH/probe.log" | grep -v "Warning\|warn("
fi

echo "=== GPU benchmarks ==="
for op in $OPS; do
  limit="${GPU_CHECK_BENCH_TIMEOUT:-${T_OP[$op]:-60}}"
  echo "--- $op (limit ${limit} s) $(elapsed) ---" | tee -a "$RESULTS/bench.log"
  # -k: a process stuck in a compile or a C call ignores SIGTERM; the run must stay inside 600 s
  timeout -k 10 "$limit" "$PY" -m fastmodels.bench.harness "$op" --device cuda >> "$RESULTS/bench.log" 2>&1
  rc=$?
  echo "exit $rc $(elapsed)" | tee -a "$RESULTS/bench.log"
done
"$PY" -m fastmodels.bench.report --device cuda --results "$RESULTS" 2>&1 | tail -60

if [ "${GPU_CHECK_PROFILE:-1}" != "0" ]; then
  echo "=== kernel-time breakdowns (limit 60 s) $(elapsed) ==="
  # electric_image and pushdown_attention first (short), the small-SVD candidates last (longest)
  prof_ops=$(for op in electric_image pushdown_attention randomized_svd; do
    case " $OPS " in *" $op "*) [ "$op" = randomized_svd ] && echo -n "$op small_svd " || echo -n "$op ";; esac; done)
  if [ -n "$prof_ops" ]; then
    timeout -k 10 60 "$PY" -m fastmodels.bench.gpu_profile $prof_ops > "$RESULTS/profile.log" 2>&1
    echo "exit $? $(elapsed)"; grep -v "^\s*$" "$RESULTS/profile.log"
  fi
fi

if [ "${GPU_CHECK_TESTS:-1}" != "0" ]; then
  # Two phases, so the tests that only a GPU can check come before the time runs out: first the
  # CUDA C++ backends (marker gpu), the Triton kernels rewritten since the last GPU run and the
  # tests that failed there; then every other Triton/GPU test in what remains of the limit.
  # single tests first (xdist hands tests out in order, so a cut-off phase loses the files' tail)
  # (test_every_tile_config left for the rest phase: its nine compiles took most of the priority
  # phase at d5741f9, where it failed as the dq probe now diagnoses, and the two NextLat tests got
  # no result)
  PRIORITY_NODES=(tests/test_nextlat.py::test_all_ignored_and_all_zero_weights tests/test_nextlat.py::test_deterministic_flag
                  tests/test_pushdown.py::test_gpu_backward_warns_past_the_verified_table_size
                  tests/test_pushdown.py::test_forward_and_grads_vs_float64_reference
                  tests/test_pushdown.py::test_long_peaked_rows_fp32_as_accurate_as_reference
                  tests/test_rsvd_kernels.py::test_jacobi_cuda_matches_reference tests/test_rsvd_kernels.py::test_jacobi_cuda_special_inputs)
  PRIORITY_FILES=(tests/test_efield.py tests/test_rsvd.py)
  PRIORITY=("${PRIORITY_NODES[@]}" "${PRIORITY_FILES[@]}")
  rest=(tests --ignore tests/test_triton_compile.py)
  for f in "${PRIORITY_FILES[@]}"; do rest+=(--ignore "$f"); done
  for node in "${PRIORITY_NODES[@]}"; do rest+=(--deselect "$node"); done
  if [ -n "${GPU_CHECK_TEST_FILES:-}" ]; then
    phases=(all); declare -A SEL=([all]="$GPU_CHECK_TEST_FILES"); declare -A LIM=([all]=$T_TESTS)
  else
    phases=(priority rest); declare -A SEL=([priority]="${PRIORITY[*]}" [rest]="${rest[*]}")
    declare -A LIM=([priority]=$(( T_TESTS * 55 / 100 )) [rest]=$(( T_TESTS - T_TESTS * 55 / 100 )))
  fi
  per_test=()  # one slow test must not eat the whole budget
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
  rcs=""
  for phase in "${phases[@]}"; do
    echo "=== GPU tests, $phase: triton and gpu markers (limit ${LIM[$phase]} s) $(elapsed) ==="
    # One autotune config per kernel: the tests check results, the benchmarks tune.
    # SIGINT at the limit: pytest stops and still reports the failures so far
    # shellcheck disable=SC2086 # SEL holds several space-separated pytest arguments
    FASTMODELS_AUTOTUNE=0 timeout -s INT -k 15 "${LIM[$phase]}" "$PY" -m pytest -v -rfE -n 8 -p no:cacheprovider -m "(triton or gpu) and not slow" \
      "${per_test[@]}" --ignore tests/test_triton_compile.py --junitxml="$SCRATCH/gpu_tests_$phase.xml" ${SEL[$phase]} \
      > "$SCRATCH/gpu_tests_$phase.log" 2>&1
    rc=$?
    rcs="$rcs $phase=$rc"
    # into the returned log at once: a run cut off later still brings this phase's lines back
    cat "$SCRATCH/gpu_tests_$phase.log" >> "$RESULTS/gpu_tests.log"
    grep -E "FAILED|ERROR|passed|failed" "$SCRATCH/gpu_tests_$phase.log" | grep -v " PASSED " | tail -30
  done
  "$PY" - "$RESULTS" "${phases[*]}" "$rcs" "$SCRATCH" <<'PYEOF'
import json, re, sys, xml.etree.ElementTree as ET
from fastmodels.bench.harness import environment
results, phases, rcs, scratch = sys.argv[1], sys.argv[2].split(), dict(kv.split("=") for kv in sys.argv[3].split()), sys.argv[4]
row = {"kind": "gpu_tests", "selection": "-m '(triton or gpu) and not slow'", "phases": {}, **environment("cuda")}
failed_all, messages = [], {}
for phase in phases:
    rc = int(rcs[phase])
    ph = {"exit_code": rc}
    try:
        suite = ET.parse(f"{scratch}/gpu_tests_{phase}.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for k in ("tests", "failures", "errors", "skipped", "time"):
            ph[k] = float(suite.get(k, 0)) if k == "time" else int(suite.get(k, 0))
        failed = [(f"{c.get('classname')}::{c.get('name')}", c.find("failure") if c.find("failure") is not None else c.find("error"))
                  for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
        failed_all += [name for name, _ in failed]
        messages.update({name: (el.get("message") or "")[:300] for name, el in failed[:50]})
    except (OSError, ET.ParseError) as exc:  # cut off by its limit: count the per-test lines instead
        log = open(f"{scratch}/gpu_tests_{phase}.log").read()
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            ph[word.lower() + "_before_cutoff"] = len(re.findall(rf"\] {word} ", log))
        failed_all += re.findall(r"\] (?:FAILED|ERROR) (\S+)", log)
        # -rfE: the short summary that pytest still prints after SIGINT ("FAILED node - message")
        messages.update({m[0]: m[1][:300] for m in re.findall(r"^(?:FAILED|ERROR) (\S+) - (.*)$", log, re.M)})
        ph["note"] = f"no junit xml (cut off by the time limit: {rc == 124}): {exc}"
    row["phases"][phase] = ph
row["failed_tests"] = sorted(set(failed_all))[:50]
row["failure_messages"] = messages
row["exit_code"] = max(int(v) for v in rcs.values())
with open(f"{results}/gpu_tests.jsonl", "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
print(json.dumps({"phases": row["phases"], "failed_tests": row["failed_tests"]}))
PYEOF
fi
echo "gpu_check finished in $(( $(date +%s) - start )) s; results in $RESULTS"
