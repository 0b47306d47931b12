#!/usr/bin/env bash
# Session 5, call 1 (H100): SSD first-call latency (fresh processes, empty Triton caches), then the
# standard ops harness at every size with peers.
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
start=$(date +%s)
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> $OUT/steps.txt 2>&1
PYTHONPATH=src:peers/site timeout 150 python -u -m ssmkit bench ops --device cuda --peers peers/site --only ssd_first_call --json $OUT/first-call.json > $OUT/first-call.txt 2>&1
echo "first call rc=$? $(( $(date +%s) - start ))s" >> $OUT/steps.txt
left=$(( 560 - ($(date +%s) - start) ))
PYTHONPATH=src:peers/site TRITON_CACHE_DIR=/tmp/tc-ops timeout $left python -u -m ssmkit bench ops --device cuda --peers peers/site --rounds 5 \
  --only ssd,selective_scan,selective_state_update,causal_conv1d,rms_norm_gated --json $OUT/ops.json > $OUT/ops.txt 2>&1
echo "ops rc=$? $(( $(date +%s) - start ))s" >> $OUT/steps.txt
