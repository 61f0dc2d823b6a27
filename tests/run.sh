#!/usr/bin/env bash
# The whole CPU test suite, in two passes:
#   1. reference and C++ cpu backends (everything not marked triton or gpu);
#   2. the Triton backends on CPU under the Triton interpreter (TRITON_INTERPRET=1).
# pytest-xdist runs each pass in worker processes, so an interpreter crash fails one test and the
# worker is replaced, instead of ending the run. Extra arguments go to both pytest calls.
set -uo pipefail
cd "$(dirname "$0")/.."
workers="${FASTMODELS_TEST_WORKERS:-2}"

run_pass() {
  local name="$1"; shift
  echo "=== pass: $name ==="
  "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then echo "(pass $name collected no test)"; rc=0; fi
  return "$rc"
}

run_pass reference python -m pytest -n "$workers" -m "not triton and not gpu" "$@"; rc1=$?
run_pass triton-interpreter env TRITON_INTERPRET=1 python -m pytest -n "$workers" -m "triton and not gpu" "$@"; rc2=$?
echo "reference pass exit $rc1, triton-interpreter pass exit $rc2"
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
