#!/usr/bin/env bash
# GPTQ speed (issue 14) in one device call: the CUDA-graph GPTQ tests (skipped on CPU), then the 1b
# Hessians + solves of the pre-#14 path and today's, side by side (JSON in $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
source gpu/setup.sh
python3 -m pytest -q -p no:cacheprovider tests/test_gptq.py -k cuda_graph 2>&1 | tail -5
timeout 480 python3 bench/gptq.py --config configs/1b.yaml --no-gemm --variants reference,fast 2>&1 | tee "$OUT/gptq.log" | tail -40
