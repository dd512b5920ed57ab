"""A checkpoint of any parallel layout as full tensors.

Full means TP=1 and keyed by the plain GPT's parameter names, whatever the TP x PP x DP layout that
wrote it (file names: pretrain.checkpoint's docstring):

- the model, from DeepSpeed's model files: split parameters (meta.json's ``tp_layout``: the dim a
  parameter is split along, null when replicated) concatenated along that dim in TP-rank order,
  everything else (replicated parameters, buffers) from TP rank 0; pipeline layer files' keys mapped
  to GPT names (``model.pipeline.to_gpt_name``). Post-training reads models this way (quant.load).
"""
import os

import torch

from model.pipeline import to_gpt_name
from pretrain.checkpoint import CheckpointError, load_file


def _model_files(meta: dict) -> list[tuple[str, int, int | None]]:
    """(file, TP rank, pipeline layer or None) of each file holding model weights."""
    tp = meta["tensor_parallel"]
    if meta.get("pipeline_parallel", 1) > 1:
        layers = meta["config"]["model"]["num_layers"]
        return [(f"layer_{i:02d}-model_{r:02d}-model_states.pt", r, i) for i in range(layers + 2) for r in range(tp)]
    return [(f"mp_rank_{r:02d}_model_states.pt", r, None) for r in range(tp)]


def model_files(meta: dict) -> list[str]:
    """The files holding the model's weights, whatever the layout."""
    return [name for name, _, _ in _model_files(meta)]


def model_shards(step_dir: str, meta: dict, mmap: bool = False) -> list[dict]:
    """Each TP rank's full-depth model state dict under GPT names."""
    layers = meta["config"]["model"]["num_layers"]
    states = [{} for _ in range(meta["tensor_parallel"])]
    for name, rank, layer in _model_files(meta):
        file = os.path.join(step_dir, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{step_dir}: missing {name} (TP rank {rank}"
                                  f"{'' if layer is None else f', pipeline layer {layer}'})")
        if layer is None:
            states[rank] = load_file(file, mmap=mmap)["module"]
        else:                 # keys relative to the pipeline layer
            states[rank].update({to_gpt_name(f"{layer}.{k}", layers): t for k, t in load_file(file, mmap=mmap).items()})
    return states


def merge_tp(shards: list[dict], layout: dict) -> dict:
    """Full tensors from TP-rank state dicts: split ones concatenated along their dim."""
    full = {}
    for name, tensor in shards[0].items():
        if tensor is None:                   # megatron's empty _extra_state entries
            continue
        dim = layout.get(name)
        if dim is None:
            full[name] = tensor
            continue
        missing = [r for r, s in enumerate(shards) if s.get(name) is None]
        if missing:
            raise CheckpointError(f"parameter {name!r} is missing from TP rank(s) {missing}")
        full[name] = torch.cat([s[name] for s in shards], dim=dim)
    absent = sorted(n for n in layout if n not in full)
    if absent:
        raise CheckpointError(f"parameters in tp_layout but not in the checkpoint: {absent[:5]}")
    return full
