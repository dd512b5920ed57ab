"""Read a training checkpoint of any parallel layout as one full (TP=1) model, for post-training.

Every problem with the checkpoint (a path that does not exist, no complete checkpoint under it,
an incomplete, damaged or foreign one) is a CheckpointError; :func:`run_cli` turns it into the one
line and exit status 2 of pretrain.train.

The tensors are consolidated from the DeepSpeed files alone, using meta.json's ``tp_layout``
(parameter name -> the dim it is split along over TP ranks, null when replicated): split
parameters are concatenated along that dim in TP-rank order, everything else (replicated
parameters, buffers) is taken from TP rank 0. No parallel model is built for this.

Pipeline parallelism: DeepSpeed's pipeline engine writes one ``layer_II-model_XX-model_states.pt``
file per pipeline layer II (0 embedding, 1..L blocks, L+1 head) and TP rank XX instead of
``mp_rank_XX_model_states.pt``; their keys are mapped back to the GPT's parameter names
(``model.pipeline.to_gpt_name``) and the TP merge is shared.
"""
import os
import sys
from typing import NamedTuple

import torch

from pretrain.checkpoint import COMPLETE, META, CheckpointError, is_complete, latest_checkpoint, load_file, read_meta, verify
from pretrain.config import Config, ConfigError, config_from_dict


class Checkpoint(NamedTuple):
    path: str            # the step directory
    meta: dict           # meta.json
    config: Config
    state: dict          # full TP=1 state dict, keyed like the GPT's state_dict()


def resolve_step_dir(path: str) -> str:
    """The step directory meant by ``path``: a step dir itself, or the newest complete checkpoint
    under a run dir (``<run>/checkpoints``) or a checkpoints dir. Incomplete ones are refused."""
    path = path.rstrip("/")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, META)) or os.path.basename(path).startswith("step"):
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): refusing to load it")
        return path
    run_root = os.path.join(path, "checkpoints")
    for root in (run_root, path):
        if os.path.isdir(root):
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(f"no complete checkpoint under {path} (looked in {run_root} and {path})")


def _read_tp_ranks(step_dir: str, meta: dict) -> list[dict]:
    """Pipeline size 1: DeepSpeed's ``mp_rank_XX_model_states.pt``, one file per TP rank."""
    states = []
    for rank in range(meta["tensor_parallel"]):
        file = os.path.join(step_dir, f"mp_rank_{rank:02d}_model_states.pt")
        if not os.path.isfile(file):
            raise CheckpointError(f"{step_dir}: missing {os.path.basename(file)} for TP rank {rank} "
                                  f"of {meta['tensor_parallel']}")
        states.append(load_file(file)["module"])
    return states


def _read_pipeline_layers(step_dir: str, meta: dict) -> list[dict]:
    """Pipeline size > 1: one file per pipeline layer and TP rank, keys relative to the layer."""
    from model.pipeline import to_gpt_name

    layers = meta["config"]["model"]["num_layers"]
    states = [{} for _ in range(meta["tensor_parallel"])]
    for index in range(layers + 2):
        for rank, state in enumerate(states):
            file = os.path.join(step_dir, f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
            if not os.path.isfile(file):
                raise CheckpointError(f"{step_dir}: missing {os.path.basename(file)} (pipeline layer {index}, "
                                      f"TP rank {rank})")
            for key, tensor in load_file(file).items():
                state[to_gpt_name(f"{index}.{key}", layers)] = tensor
    return states


def _model_files(meta: dict) -> list[str]:
    """The files holding the model's weights (what post-training reads), whatever the layout."""
    tp = meta["tensor_parallel"]
    if meta.get("pipeline_parallel", 1) > 1:
        layers = meta["config"]["model"]["num_layers"]
        return [f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(layers + 2) for r in range(tp)]
    return [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]


def _tp_rank_states(step_dir: str, meta: dict) -> list[dict]:
    """Each TP rank's full-depth state dict, whatever the file layout, after checking the files
    against the checkpoint's recorded sizes and digests."""
    problems = verify(step_dir, _model_files(meta), distributed=False)
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} does not verify: {'; '.join(problems)}")
    if meta.get("pipeline_parallel", 1) > 1:
        return _read_pipeline_layers(step_dir, meta)
    return _read_tp_ranks(step_dir, meta)


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


def load_checkpoint(path: str) -> Checkpoint:
    """Resolve ``path`` (see resolve_step_dir) and consolidate its model state to TP=1."""
    step_dir = resolve_step_dir(path)
    try:
        meta = read_meta(step_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: no readable {META} ({e})") from None
    for key in ("config", "tp_layout", "tensor_parallel"):
        if key not in meta:
            raise CheckpointError(f"{step_dir}/{META} has no {key!r}; not a pretrain checkpoint")
    try:
        config = config_from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {step_dir} holds a config this code refuses: {e}") from None
    state = merge_tp(_tp_rank_states(step_dir, meta), meta["tp_layout"])
    return Checkpoint(step_dir, meta, config, state)


def build_model(ckpt: Checkpoint, device="cpu") -> torch.nn.Module:
    """The TP=1 GPT of the checkpoint in eval mode, QAT input quantizers attached (and loaded)
    when it was trained with them; the kurtosis regularizer is a training-only loss and left off.
    parallel_state must be initialized with TP=1 (pretrain.parallel.init_distributed)."""
    from megatron.core import parallel_state

    from model.gpt import build_gpt
    from qat.quantizer import attach_qat

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("post-training runs the full model on every rank: use parallel.tensor=1")
    model = build_gpt(ckpt.config.model)
    attach_qat(model, ckpt.config.qat)
    model.load_state_dict(ckpt.state)
    return model.to(device).eval()


def run_cli(main) -> int:
    """The exit status of a post-training command line's ``main()``: 2 with one line on stderr for a
    checkpoint it cannot use (``checkpoint error: ...``, as pretrain.train says it, also under
    torchrun, where each rank says it and no rank prints a traceback), else 0."""
    try:
        main()
    except CheckpointError as e:
        sys.stderr.write(f"checkpoint error: {e}\n")   # one write: the ranks' lines do not interleave
        return 2
    return 0
