#!/usr/bin/env bash
# Post-training of one checkpoint: GPTQ W4 weights, the W16A16/W8A8/W4A16/W4A4 table and the
# quantizability analysis. Usage: launch/posttrain.sh RUN_DIR [OUT_DIR] [-- extra quant.evaluate args]
# Env: NPROC (GPTQ ranks via torchrun, default 1), METHOD (default gptq), NSAMPLES (default 128),
# COMPARE (a second run dir for the side-by-side analysis).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1; OUT=${2:-$RUN/posttrain}; shift $(( $# < 2 ? $# : 2 )); [ "${1:-}" = "--" ] && shift
mkdir -p "$OUT"
if [ "${NPROC:-1}" -gt 1 ]; then GPTQ=(torchrun --standalone --nproc-per-node "$NPROC" -m quant.quantize)
else GPTQ=(python -m quant.quantize); fi
"${GPTQ[@]}" --checkpoint "$RUN" --output "$OUT/w4-${METHOD:-gptq}" --method "${METHOD:-gptq}" --bits 4 \
    --nsamples "${NSAMPLES:-128}"
python -m quant.evaluate --checkpoint "$RUN" --quantized "$OUT/w4-${METHOD:-gptq}" --output "$OUT/eval.json" "$@"
python -m quant.analyze --checkpoint "$RUN" ${COMPARE:+--compare "$COMPARE"} --output "$OUT/analysis"
