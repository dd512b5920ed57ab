#!/usr/bin/env bash
# Issue 13's measurements at 125m in one 10-minute device call: the loss kernel against megatron's
# (bench/loss.py, which also checks it runs on the GPU), the training step side by side
# (gpu/step.sh's variants, CUDA graphs included), then the CUDA-graph path's losses and gradients
# against eager (bench/compile_check.py; perf_hints name any block cudagraphs skipped). JSON and
# logs come back under $OUT. The 1b step: VARIANTS=... bash gpu/step.sh --config configs/1b.yaml --micro-batch 8
set -uo pipefail
cd "$(dirname "$0")/.."
source gpu/setup.sh
timeout 90 python3 bench/loss.py 2>&1 | tee "$OUT/loss.log" | grep -v "^\s*$" | tail -12
VARIANTS=${VARIANTS:-plain-compile,ours-qat,ours-qat@train.compile=true@train.compile_mode=reduce-overhead} \
  LIMIT=${LIMIT:-330} bash gpu/step.sh --profile
TORCH_LOGS=perf_hints timeout 120 python3 bench/compile_check.py --config configs/125m.yaml --micro-batch 16 --steps 8 \
  --mode reduce-overhead > "$OUT/compile_check.log" 2>&1
echo "compile_check rc $?"
grep -i "cudagraph\|mismatch\|error" "$OUT/compile_check.log" | sort | uniq -c | head -20
grep -v "^\s*$" "$OUT/compile_check.log" | tail -12
