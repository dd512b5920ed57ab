#!/usr/bin/env bash
# Pretraining under the deepspeed launcher, on this host or on every host of a hostfile (it starts
# the other hosts over passwordless ssh; the repository must be at the same path on each).
#   launch/deepspeed.sh --config configs/125m.yaml [--section.key value ...]
#   HOSTFILE=launch/hostfile launch/deepspeed.sh --config configs/1b.yaml
# Environment (defaults): HOSTFILE (none: this host only; format in launch/hostfile.example),
#   NUM_GPUS (processes per host: all GPUs, or the hostfile's slots), MASTER_ADDR (first host),
#   MASTER_PORT (29500).
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
[ -n "${NUM_GPUS:-}" ] && ARGS+=(--num_gpus "$NUM_GPUS")
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
exec deepspeed "${ARGS[@]}" --module pretrain.train "$@"
