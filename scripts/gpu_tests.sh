#!/usr/bin/env bash
# The test suite on a CUDA machine, in slices that each leave their result behind, for the
# device tool (one call of at most 10 minutes):
#
#   PYTHONPATH=src:peers/site bash scripts/gpu_tests.sh "$OUT" 540
#
# Most of a GPU run's time is Triton compiling one kernel variant per combination of flags and
# dtypes the tests use (the first run on a machine measured ~3 s per test); TRITON_CACHE_DIR keeps
# the compiled kernels under OUT_DIR/triton-cache so a later call on a warm machine reuses them.
# Each slice writes a JUnit XML and its log; slices past the time budget are listed as not run.
set -u
out=${1:?usage: gpu_tests.sh OUT_DIR [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$out/triton-cache}
start=$(date +%s)
slices=(
  "tests/ops/test_step_triton.py tests/ops/test_conv1d_triton.py tests/ops/test_norm_triton.py"
  "tests/ops/test_ssd_triton.py"
  "tests/ops/test_selective_scan_triton.py"
  "tests/models/test_compile.py tests/models/test_autocast.py tests/inference"
  "tests/ops/test_ssd.py tests/ops/test_selective_scan.py tests/ops/test_step.py tests/ops/test_conv1d.py tests/ops/test_norm.py"
  "tests/models tests/layers"
  "tests/training tests/evaluation tests/data tests/cli"
)
for i in "${!slices[@]}"; do
  left=$(( budget - ($(date +%s) - start) ))
  if (( left < 20 )); then
    echo "slice $i not run (budget spent): ${slices[$i]}" | tee -a "$out/summary.txt"
    continue
  fi
  # shellcheck disable=SC2086 - each slice is a list of paths
  timeout "$left" python -m pytest -q -p no:cacheprovider --durations=10 \
    --junitxml="$out/slice$i.xml" ${slices[$i]} > "$out/slice$i.log" 2>&1
  echo "slice $i rc=$? ($(tail -1 "$out/slice$i.log")): ${slices[$i]}" | tee -a "$out/summary.txt"
done
