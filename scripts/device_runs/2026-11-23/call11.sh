#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc11
mkdir -p $OUT
start=$(date +%s)
PYTHONPATH=src timeout 170 python -m pytest -q -p no:cacheprovider -n 12 tests/ops/test_ssd.py tests/ops/test_ssd_triton.py tests/layers/test_layers.py tests/models/test_compile.py tests/models/test_autocast.py tests/models/test_model.py > $OUT/tests.txt 2>&1
echo "tests rc=$? $(( $(date +%s) - start ))s" >> $OUT/steps.txt
left=$(( 400 - ($(date +%s) - start) ))
PYTHONPATH=src:peers/site timeout $left python -u -m ssmkit bench ops --device cuda --peers peers/site --rounds 5 --only ssd --json $OUT/ops-ssd.json > $OUT/ops-ssd.txt 2>&1
echo "ops rc=$? $(( $(date +%s) - start ))s" >> $OUT/steps.txt
