#!/usr/bin/env bash
# Session 5, call 3: HF-reference tests without peers (transformers 5.17 there), then Tiny Shakespeare
# Transformer vs Mamba-2 with a warm Triton cache (as a user's second run on the machine).
set -u
export PYTHONUNBUFFERED=1
R=$OUT; mkdir -p $R
start=$(date +%s)
stamp() { echo "$(( $(date +%s) - start ))s $*" >> $R/steps.txt; }
( python -c "import transformers; print('transformers', transformers.__version__)"; PYTHONPATH=src timeout 150 python -m pytest -q -p no:cacheprovider -n 8 --tb=short tests/evaluation/test_compare.py tests/models/test_hf.py tests/inference/test_hf_generate.py tests/ops/test_hf_reference.py ) > $R/hf-tests.txt 2>&1; stamp "hf tests rc=$?"
COMMON="data.path=gpu_work/data/tinyshakespeare.txt checkpoint.every=0 checkpoint.golden=none tensorboard=false progress=false eval_every=50"
export TRITON_CACHE_DIR=/tmp/tc-shared
PYTHONPATH=src timeout 100 python -u -m ssmkit train --config configs/train/shakespeare-mamba2.yaml out_dir=/tmp/runs/warm max_steps=2 $COMMON > $R/warmup.txt 2>&1; stamp "warm-up rc=$?"
PYTHONPATH=src timeout 110 python -u -m ssmkit train --config configs/train/shakespeare-transformer.yaml out_dir=/tmp/runs/t max_steps=3000 max_seconds=60 $COMMON > $R/train-transformer.txt 2>&1; stamp "transformer rc=$?"
cp /tmp/runs/t/log.jsonl $R/log-transformer.jsonl
PYTHONPATH=src timeout 110 python -u -m ssmkit train --config configs/train/shakespeare-mamba2.yaml out_dir=/tmp/runs/m max_steps=1900 max_seconds=60 $COMMON > $R/train-mamba2.txt 2>&1; stamp "mamba2 rc=$?"
cp /tmp/runs/m/log.jsonl $R/log-mamba2.jsonl
