#!/usr/bin/env bash
# QAT / kurtosis recipe comparison on one GPU: the 125m GPT trained for STEPS steps under each
# recipe from the same data, then W16A16 and W4A4 (RTN 4-bit weights) WikiText-2 / C4
# perplexity. Usage: bench/recipes.sh CORPUS_DIR [STEPS] [RECIPE...]; CORPUS_DIR holds
# jsonl(.xz) training shards and valid.jsonl.xz. Results: runs/recipes/<recipe>/eval.json, logs
# runs/recipes/<recipe>.log.
# RECIPE: baseline[-seedN] | qat[-minmax|-mse][-seedN][-startN][-kurt-LAMBDA] (-seedN: train.seed,
# default 1234; -startN: qat.start_step);
# qat alone starts its clips at the qat.init_value constant.
# TRAIN_ARGS (environment) are appended to every training command, e.g. "--qat.init_value 2.0".
# JOBS (environment, default 1) recipes share the GPU at a time: small models leave it mostly idle.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=$1; STEPS=${2:-300}; shift $(( $# < 2 ? $# : 2 ))
RECIPES=${*:-baseline qat qat-kurt-1e-4 qat-kurt-1e-3}
D=runs/recipes/data
mkdir -p $D
train_shards=$(ls $CORPUS/*.jsonl* | grep -v valid)
[ -f $D/tokenizer.model ] || python -m data_prep.train_tokenizer --input $train_shards --vocab-size 8192 \
    --model-type bpe --output $D/tokenizer --max-sentences 400000 --threads 16
[ -f $D/train.idx ] || python -m data_prep.tokenize --input $train_shards --tokenizer $D/tokenizer.model \
    --output-prefix $D/train --workers 16 --append-eod
[ -f $D/valid.idx ] || python -m data_prep.tokenize --input $CORPUS/valid.jsonl.xz --tokenizer $D/tokenizer.model \
    --output-prefix $D/valid --workers 4 --append-eod

recipe() {
  local r=$1 q=false k=false lam=0 init=constant seed=1234 start=0
  case $r in
    baseline|baseline-seed*) ;;
    qat|qat-*) q=true ;;
    *) echo "unknown recipe $r"; return 2 ;;
  esac
  [[ $r == *-minmax* ]] && init=minmax
  [[ $r == *-mse* ]] && init=mse
  [[ $r == *-kurt-* ]] && { k=true; lam=${r##*-kurt-}; }
  [[ $r == *-seed* ]] && { seed=${r##*-seed}; seed=${seed%%-*}; }
  [[ $r == *-start* ]] && { start=${r##*-start}; start=${start%%-*}; }
  local out=runs/recipes/$r
  python -m pretrain.train --config configs/125m.yaml --model.vocab_size 8192 --train.steps $STEPS \
      --train.micro_batch_size 16 --train.global_batch_size 64 --optim.warmup_steps $((STEPS / 10)) \
      --optim.lr 1.0e-3 --optim.min_lr 1.0e-4 --train.eval_interval 0 --train.log_interval 50 \
      --checkpoint.interval 0 --checkpoint.resume none --train.out_dir $out --train.seed $seed \
      --data.paths "[$D/train]" --data.valid_paths "[$D/valid]" --data.tokenizer $D/tokenizer.model \
      --data.cache_dir $out/index-cache \
      --qat.enabled $q --qat.init $init --qat.start_step $start --kurtosis.enabled $k --kurtosis.lambda $lam ${TRAIN_ARGS:-} 2>&1 \
      | grep -E "step [0-9]+/|valid loss|Error|error"
  python -m quant.evaluate --checkpoint $out --configs W16A16 W4A4 --tasks --ppl-windows 64 \
      --output $out/eval.json 2>&1 | grep -vE "^\[|warn" | tail -4
}

for r in $RECIPES; do
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1}" ]; do wait -n || true; done
  echo "start $r"
  recipe $r > runs/recipes/$r.log 2>&1 &
done
wait
for r in $RECIPES; do echo "== $r"; cat runs/recipes/$r.log; done
