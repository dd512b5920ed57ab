#!/usr/bin/env bash
# Pretraining under torchrun: one process per GPU of this node (one per CPU rank without GPUs).
#   one node:       launch/torchrun.sh --config configs/125m.yaml [--section.key value ...]
#   several nodes:  run on every node with the same NNODES, MASTER_ADDR and MASTER_PORT:
#                   NNODES=2 MASTER_ADDR=node001 launch/torchrun.sh --config configs/1b.yaml
# Environment (defaults): NPROC_PER_NODE (GPUs on this node, else 1), NNODES (1),
#   MASTER_ADDR (127.0.0.1) and MASTER_PORT (29500): the c10d rendezvous endpoint (on one of the nodes),
#   RDZV_ID (pretrain): the same for every node of one job.
# SIGTERM / SIGUSR1 to this script go to the training processes only: they finish the step, save a
# checkpoint and exit 0, and so does this script (torchrun itself would SIGKILL them after 30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
python -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "${NNODES:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    --rdzv-id "${RDZV_ID:-pretrain}" -m pretrain.train "$@" &
LAUNCHER=$!
trap 'pkill -USR1 -P $LAUNCHER' USR1
trap 'pkill -TERM -P $LAUNCHER' TERM
while true; do   # a trapped signal interrupts wait; wait again until torchrun has exited
    code=0
    wait "$LAUNCHER" || code=$?
    kill -0 "$LAUNCHER" 2>/dev/null || exit "$code"
done
