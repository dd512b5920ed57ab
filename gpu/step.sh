#!/usr/bin/env bash
# Training-step speed (issue 13) at the study's 125m shapes, side by side in one call:
#   [VARIANTS=a,b,...] [LIMIT=seconds] bash gpu/step.sh [more bench/train_step.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
source gpu/setup.sh
timeout "${LIMIT:-300}" python3 bench/train_step.py --config configs/125m.yaml --micro-batch 16 \
  --variants "${VARIANTS:-plain-compile,ours-qat}" --repeats 2 --steps 15 --warmup 5 "$@" 2>&1 \
  | tee "$OUT/step.log" | grep -v "^\s*$" | tail -60
