#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
start=$(date +%s)
stamp() { echo "$(( $(date +%s) - start ))s $*" >> $OUT/steps.txt; }
export TRITON_CACHE_DIR=/tmp/tc9
PYTHONPATH=src timeout 200 python -m pytest -q -p no:cacheprovider -n 12 tests/ops/test_ssd_triton.py tests/ops/test_ssd.py > $OUT/ssd-tests.txt 2>&1; stamp "tests rc=$?"
PYTHONPATH=src:peers/site timeout 150 python -u scripts/gpu_check_ssd.py --only sweep --json $OUT/sweep.json > $OUT/sweep.txt 2>&1; stamp "sweep rc=$?"
left=$(( 560 - ($(date +%s) - start) ))
PYTHONPATH=src:peers/site timeout $left python -u -m ssmkit bench ops --device cuda --peers peers/site --rounds 5 --only ssd --json $OUT/ops-ssd.json > $OUT/ops-ssd.txt 2>&1; stamp "ops rc=$?"
