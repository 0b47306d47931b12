#!/usr/bin/env bash
# Session 4, call 3: Tiny Shakespeare 10M Transformer vs Mamba-2 with an eval every 50 steps (the
# session-3 schedules, cut at 60 s of training); then, in parallel, the synthetic tasks (issue 7's
# paper sizes, issue 8's GroundedMamba vs Mamba-2) and the HF-reference tests without peers.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/tasks
start=$(date +%s)
stamp() { echo "$(( $(date +%s) - start ))s $*" >> $R/steps.txt; }
COMMON="data.path=gpu_work/data/tinyshakespeare.txt checkpoint.every=0 checkpoint.golden=none tensorboard=false progress=false eval_every=50 max_seconds=60"
PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc-t timeout 110 python -u -m ssmkit train --config configs/train/shakespeare-transformer.yaml out_dir=/tmp/runs/t max_steps=3000 $COMMON > $R/train-transformer.txt 2>&1; stamp "transformer rc=$?"
cp /tmp/runs/t/log.jsonl $R/log-transformer.jsonl
PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc-m timeout 110 python -u -m ssmkit train --config configs/train/shakespeare-mamba2.yaml out_dir=/tmp/runs/m max_steps=1900 $COMMON > $R/train-mamba2.txt 2>&1; stamp "mamba2 rc=$?"
cp /tmp/runs/m/log.jsonl $R/log-mamba2.jsonl
left=$(( 545 - ($(date +%s) - start) ))
for f in gpu_work/tasks/*.yaml; do
  name=$(basename $f .yaml); task=$(head -1 $f | cut -d' ' -f2)
  PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc-$name timeout $left python -u -m ssmkit eval $task --config $f --device cuda --no-progress --out $R/tasks/$name > $R/tasks/$name.log 2>&1 &
done
( python -c "import transformers; print('transformers', transformers.__version__)"; PYTHONPATH=src timeout 200 python -m pytest -q -p no:cacheprovider -n 4 --tb=short tests/evaluation/test_compare.py tests/models/test_hf.py tests/inference/test_hf_generate.py tests/ops/test_hf_reference.py ) > $R/hf-tests.txt 2>&1 &
( PYTHONPATH=src:peers/site timeout 200 python -m pytest -q -p no:cacheprovider --tb=short -x tests/ops/test_hf_reference.py ) > $R/hf-tests-with-peers.txt 2>&1 &
wait; stamp "parallel jobs done"
cd $OUT && tar czf results.tgz r && rm -rf r
