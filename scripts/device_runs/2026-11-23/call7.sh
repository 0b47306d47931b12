#!/usr/bin/env bash
# Session 5, call 4 (2x H200): data-parallel scaling of the trainer (issue 6). mamba2-130m, seqlen 2048,
# bf16, 30 steps each; median tokens/s over steps >= 5 from each run's log.jsonl.
set -u
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc-scale
R=$OUT; mkdir -p $R
start=$(date +%s)
stamp() { echo "$(( $(date +%s) - start ))s $*" >> $R/steps.txt; }
nvidia-smi --query-gpu=name,memory.total --format=csv >> $R/steps.txt 2>&1
nvidia-smi topo -m >> $R/steps.txt 2>&1
C=configs/train/bench-2x.yaml
run1() { name=$1; shift; PYTHONPATH=src timeout 150 python -u -m ssmkit train --config $C out_dir=/tmp/runs/$name "$@" > $R/$name.txt 2>&1; stamp "$name rc=$?"; cp /tmp/runs/$name/log.jsonl $R/log-$name.jsonl; }
run2() { name=$1; shift; PYTHONPATH=src timeout 150 torchrun --standalone --nproc_per_node 2 -m ssmkit train --config $C out_dir=/tmp/runs/$name "$@" > $R/$name.txt 2>&1; stamp "$name rc=$?"; cp /tmp/runs/$name/log.jsonl $R/log-$name.jsonl; }
run1 warmup max_steps=3
run1 gpu1-mb8 data.micro_batch_size=8
run2 gpu2-ddp-mb8 data.micro_batch_size=8
run1 gpu1-mb16 data.micro_batch_size=16
run2 gpu2-fsdp-mb8 data.micro_batch_size=8 distributed=fsdp
run1 gpu1-mb8-again data.micro_batch_size=8
python - <<PY >> $R/steps.txt 2>&1
import json, statistics, glob
for f in sorted(glob.glob("$R/log-gpu*.jsonl")):
    steps = [json.loads(l) for l in open(f)]
    steps = [s for s in steps if s.get("type") == "step" and s["step"] >= 5]
    if steps:
        print(f, len(steps), "median tokens/s", round(statistics.median(s["tokens_per_s"] for s in steps)), "step s", round(statistics.median(s["step_time_s"] for s in steps), 4), "mem", steps[-1].get("memory_gb"))
PY
