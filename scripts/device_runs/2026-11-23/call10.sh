#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT/mqar
start=$(date +%s)
for m in mamba1 mamba2 attention; do
  PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc-$m timeout 400 python -u -m ssmkit eval mqar --config configs/tasks/h100-2026-11-23/mqar-$m.yaml --device cuda --no-progress --out $OUT/mqar/$m > $OUT/mqar/$m.log 2>&1 &
done
wait
echo "done $(( $(date +%s) - start ))s" >> $OUT/steps.txt
cd $OUT && tar czf mqar.tgz mqar && rm -rf mqar
