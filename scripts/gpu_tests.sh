#!/usr/bin/env bash
# The whole test suite on a CUDA machine within one call of the device tool (at most 10 minutes):
#
#   PYTHONPATH=src bash scripts/gpu_tests.sh "$OUT" 540 [WORKERS]
#
# Most of a GPU run's time is Triton compiling one kernel variant per combination of flags, dtypes
# and block sizes the tests use (~3-6 s each, on the CPU): run serially, the Triton-kernel tests
# alone took over 400 s (session 4). pytest-xdist spreads the tests over the machine's cores; the
# workers share one on-disk Triton cache. The log is verbose (one line per test, written as the
# tests finish), so a run cut short by the budget still says which tests passed and failed.
set -u
out=${1:?usage: gpu_tests.sh OUT_DIR [SECONDS] [WORKERS]}
budget=${2:-540}
workers=${3:-$(( $(nproc) - 2 ))}
mkdir -p "$out"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$out/triton-cache}
timeout "$budget" python -m pytest -v -p no:cacheprovider -n "$workers" --timeout 300 \
  --durations=25 --junitxml="$out/junit.xml" tests > "$out/tests.log" 2>&1
rc=$?
{
  echo "rc=$rc (124: the budget of ${budget}s ran out)"
  echo "passed: $(grep -c ' PASSED ' "$out/tests.log") failed: $(grep -c ' FAILED ' "$out/tests.log")" \
    "skipped: $(grep -c ' SKIPPED ' "$out/tests.log") errors: $(grep -c ' ERROR ' "$out/tests.log")"
  grep -E ' (FAILED|ERROR) ' "$out/tests.log" | head -50
  tail -3 "$out/tests.log"
} > "$out/summary.txt"
cat "$out/summary.txt"
