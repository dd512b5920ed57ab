"""A checkpoint of any parallel layout as full tensors, and resuming it under another layout.

Full means TP=1 and keyed by the plain GPT's parameter names, whatever the TP x PP x DP layout that
wrote it (file names: pretrain.checkpoint's docstring):

- the model, from DeepSpeed's model files: split parameters (meta.json's ``tp_layout``: the dim a
  parameter is split along, null when replicated) concatenated along that dim in TP-rank order,
  everything else (replicated parameters, buffers) from TP rank 0; pipeline layer files' keys mapped
  to GPT names (``model.pipeline.to_gpt_name``). :func:`load_checkpoint` reads a checkpoint this way
  for post-training, after resolving the path and verifying the files (every problem a CheckpointError).
- under ZeRO 1/2, the optimizer: each DP rank's ``*_optim_states.pt`` holds, per parameter group, a
  flat fp32 partition (master weights) and AdamW's ``exp_avg`` / ``exp_avg_sq`` of the same shape, and
  ``param_slice_mappings``, where each parameter's fragment starts in it. A parameter's TP shard is its
  fragments concatenated in DP-rank order (partitions cut the group's flat buffer in rank order); the
  TP merge is then the model's.

:func:`load_resharded` (``checkpoint.reshard``) slices those tensors for this rank's TP shard and
pipeline stage and writes them into a freshly built engine: the weights into the module, the fp32
master weights and moments through DeepSpeed's fragment mapping (``safe_set_full_fp32_param``,
``safe_set_full_optimizer_state``: each rank keeps what its new DP partition covers). Every value is
copied, none recomputed, so the new engine holds the saved state exactly. Each rank reads every file
(memory-mapped) and builds full tensors only for its own parameters.
"""
import os
from typing import NamedTuple

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from model.pipeline import to_gpt_name
from model.sharding import shard_state_dict
from pretrain.checkpoint import (COMPLETE, META, CheckpointError, is_complete, latest_checkpoint, load_file, read_meta,
                                 saved_layout, verify)
from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.parallelize import is_pipeline


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


def _tp_rank_states(step_dir: str, meta: dict) -> list[dict]:
    """Each TP rank's full-depth state dict, whatever the file layout, after checking the files
    against the checkpoint's recorded sizes and digests."""
    problems = verify(step_dir, model_files(meta), distributed=False)
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} does not verify: {'; '.join(problems)}")
    return model_shards(step_dir, meta)


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


def optimizer_shards(step_dir: str, meta: dict, weights: list[dict], names: set[str]) -> tuple[list[dict], dict]:
    """Per TP rank ``{key: {name: tensor}}`` for the fp32 master weights (key ``fp32``) and each
    per-element AdamW state of the parameters in ``names``, shaped as their TP shards in ``weights``
    (per TP rank, name -> tensor); and the rest: the optimizer ``step`` and DeepSpeed's ``loss_scaler``."""
    sizes, layers = saved_layout(step_dir, meta), meta["config"]["model"]["num_layers"]
    pipeline = sizes["pipeline"] > 1
    prefix = "bf16_" if meta["config"]["train"]["bf16"] else ""
    pieces = [{} for _ in range(sizes["tensor"])]     # TP rank -> name -> key -> fragments in DP order
    steps, scaler = set(), None
    for stage in range(sizes["pipeline"]):
        for rank in range(sizes["tensor"]):
            for dp in range(sizes["data"]):
                name = f"{prefix}zero_pp_rank_{dp}_mp_rank_{stage * sizes['tensor'] + rank:02d}_optim_states.pt"
                file = os.path.join(step_dir, name)
                if not os.path.isfile(file):
                    raise CheckpointError(f"{step_dir}: missing {name} (pipeline stage {stage}, TP rank {rank}, "
                                          f"DP rank {dp})")
                sd = load_file(file, mmap=True)["optimizer_state_dict"]
                scaler = sd["loss_scaler"] if scaler is None else scaler
                for group, mapping in enumerate(sd["param_slice_mappings"]):
                    state = sd["base_optimizer_state"]["state"][group]
                    steps.add(float(state["step"]))
                    flat = {"fp32": sd["single_partition_of_fp32_groups"][group],
                            **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}
                    for param, address in mapping.items():
                        param = to_gpt_name(param, layers) if pipeline else param
                        if param in names:
                            frags = pieces[rank].setdefault(param, {k: [] for k in flat})
                            for k, v in flat.items():
                                frags[k].append(v.detach().narrow(0, address.start, address.numel))
    if len(steps) > 1:
        raise CheckpointError(f"{step_dir}: its optimizer shards are at different steps {sorted(steps)}")
    out = []
    for rank, params in enumerate(pieces):
        keys = {}
        for param, frags in params.items():
            shard = weights[rank][param]
            for k, parts in frags.items():
                flat = torch.cat(parts)
                if flat.numel() != shard.numel():
                    raise CheckpointError(f"{step_dir}: the optimizer fragments of {param} (TP rank {rank}) hold "
                                          f"{flat.numel()} values, its shard {tuple(shard.shape)} has {shard.numel()}")
                keys.setdefault(k, {})[param] = flat.view(shard.shape)
        out.append(keys)
    return out, {"step": torch.tensor(steps.pop()), "loss_scaler": scaler}


def full_training_state(step_dir: str, meta: dict, names: set[str]) -> tuple[dict, dict, dict]:
    """(model state, {optimizer key: full tensors}, {"step", "loss_scaler"}) of the entries in
    ``names`` (GPT names: parameters and buffers), full over TP."""
    shards = [{n: t for n, t in s.items() if n in names} for s in model_shards(step_dir, meta, mmap=True)]
    layout = {n: d for n, d in meta["tp_layout"].items() if n in names}
    model = merge_tp(shards, layout)
    params = set(layout)
    missing = sorted(names - set(model))
    if missing:
        raise CheckpointError(f"{step_dir} has no {missing[:5]} for this run's model")
    optim, rest = optimizer_shards(step_dir, meta, shards, params)
    keys = set(optim[0])
    return model, {k: merge_tp([o[k] for o in optim], layout) for k in keys}, rest


def load_resharded(engine, step_dir: str, meta: dict) -> None:
    """Load a checkpoint of another layout into ``engine`` (ZeRO 1/2, built for this run's layout,
    before its first step): weights and buffers, fp32 master weights, AdamW moments and step, the
    loss scale and DeepSpeed's step counters. Random streams are not part of it (they are per rank)."""
    module = engine.module
    layers = meta["config"]["model"]["num_layers"]
    gpt = (lambda n: to_gpt_name(n, layers)) if is_pipeline(module) else (lambda n: n)  # noqa: E731
    local = {n: gpt(n) for n, t in module.state_dict().items() if t is not None}
    model, optim, rest = full_training_state(step_dir, meta, set(local.values()))
    params = [n for n, _ in module.named_parameters()]

    def shard(full: dict) -> dict:
        return shard_state_dict({n: full[local[n]] for n in params}, module)

    weights = shard(model)
    module.load_state_dict({**{n: model[g] for n, g in local.items() if n not in weights}, **weights}, strict=False)
    master = shard(optim.pop("fp32"))
    moments = {k: shard(v) for k, v in optim.items()}
    _create_optimizer_state(engine, rest["step"], list(moments))
    for n, p in module.named_parameters():
        safe_set_full_fp32_param(p, master[n])
        for k, values in moments.items():
            safe_set_full_optimizer_state(p, values[n], k)
    engine.optimizer.loss_scaler = rest["loss_scaler"]
    counters = load_file(os.path.join(step_dir, "mp_rank_00_model_states.pt"), mmap=True)
    engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]


def _create_optimizer_state(engine, step: torch.Tensor, keys: list[str]) -> None:
    """AdamW's state for each flat fp32 partition (zeros, at ``step``), linked to the parameters'
    fragments. The state exists only after a first step, and DeepSpeed links the fragments then; a
    resharded engine must be written before that, so both happen here, through the same calls."""
    base = engine.optimizer.optimizer
    state = {i: {"step": step.clone(), **{k: torch.zeros_like(g["params"][0]) for k in keys}}
             for i, g in enumerate(base.param_groups)}
    base.load_state_dict({"state": state, "param_groups": base.state_dict()["param_groups"]})
    engine.optimizer._lazy_init_hp_params_optimizer_state()
