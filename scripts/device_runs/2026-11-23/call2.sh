#!/usr/bin/env bash
# Session 4, call 2: issue 8's Tiny Shakespeare side-by-side (GroundedMamba-minimal vs a Mamba-2 of
# the same parameter count, same tokens per step and steps, eval every 50), then the GPU test suite.
set -u
export PYTHONPATH=src:peers/site PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
start=$(date +%s)
stamp() { echo "$(( $(date +%s) - start ))s $*" >> $R/steps.txt; }
COMMON="data.path=gpu_work/data/tinyshakespeare.txt checkpoint.every=0 checkpoint.golden=none tensorboard=false progress=false eval_every=50 max_steps=600 max_seconds=170"
TRITON_CACHE_DIR=/tmp/tc-m timeout 200 python -u -m ssmkit train --config configs/train/shakespeare-mamba2-26m.yaml out_dir=/tmp/runs/m $COMMON > $R/train-mamba2-26m.txt 2>&1; stamp "mamba2-26m rc=$?"
cp /tmp/runs/m/log.jsonl $R/log-mamba2-26m.jsonl
TRITON_CACHE_DIR=/tmp/tc-g timeout 200 python -u -m ssmkit train --config configs/train/grounded-minimal.yaml data.micro_batch_size=64 out_dir=/tmp/runs/g $COMMON > $R/train-grounded.txt 2>&1; stamp "grounded rc=$?"
cp /tmp/runs/g/log.jsonl $R/log-grounded.jsonl
left=$(( 550 - ($(date +%s) - start) ))
TRITON_CACHE_DIR=/tmp/tc bash scripts/gpu_tests.sh $R/tests $left 14 > $R/gpu_tests.txt 2>&1; stamp "gpu tests"
rm -rf $R/tests/triton-cache
cd $OUT && tar czf results.tgz r && rm -rf r
