#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT
PYTHONPATH=src:peers/site timeout 150 python -u scripts/device_runs/2026-11-23/profile_ssd.py 4 8192 > $OUT/profile-4x8192.txt 2>&1
echo "profile rc=$?" >> $OUT/steps.txt
PYTHONPATH=src timeout 200 python -u -m ssmkit bench generate --device cuda --batches 64 --prompts 8192 --rounds 3 --json $OUT/generate-b64-8k.json > $OUT/generate-b64-8k.txt 2>&1
echo "gen rc=$?" >> $OUT/steps.txt
