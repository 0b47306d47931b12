#!/usr/bin/env bash
# Session 5, call 2 (H100): generation benchmark at the sizes session 3 did not measure.
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
start=$(date +%s)
PYTHONPATH=src timeout 400 python -u -m ssmkit bench generate --device cuda --batches 1,16,64 --prompts 2048,32768 --rounds 3 --json $OUT/generate-2k-32k.json > $OUT/generate-2k-32k.txt 2>&1
echo "2k/32k rc=$? $(( $(date +%s) - start ))s" >> $OUT/steps.txt
left=$(( 570 - ($(date +%s) - start) ))
PYTHONPATH=src timeout $left python -u -m ssmkit bench generate --device cuda --batches 16 --prompts 8192 --rounds 3 --json $OUT/generate-b16-8k.json > $OUT/generate-b16-8k.txt 2>&1
echo "b16 8k rc=$? $(( $(date +%s) - start ))s" >> $OUT/steps.txt
