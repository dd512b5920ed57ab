"""Sharded checkpoints: DeepSpeed's per-rank model and optimizer shards plus our client state.

Layout under ``<out_dir>/checkpoints``::

    step00000100/        DeepSpeed's files for that step, our rng_rank*.pt, meta.json and COMPLETE
    latest               name of the newest complete checkpoint, replaced atomically

DeepSpeed's files in a step directory: without pipeline parallelism ``mp_rank_XX_model_states.pt``
(XX = TP rank) holds the module's state dict under ``module`` with the plain GPT's parameter
names. With pipeline parallelism the weights are per layer instead,
``layer_II-model_XX-model_states.pt`` (II = pipeline layer: 0 embedding, 1..L blocks, L+1 final
norm + head; names inside are relative to the layer; ``model.pipeline.to_gpt_name`` maps them),
and ``mp_rank_XX_model_states.pt`` (XX = pipeline stage x TP rank) carries no module.
Optimizer shards are ``*_optim_states.pt`` in both cases.

A checkpoint counts only once every rank has written its files (a barrier) and rank 0 has
written COMPLETE; ``latest`` is updated after that, so a crash mid-save leaves the previous
checkpoint as the one to resume from. meta.json (also DeepSpeed's client state) holds the
iteration, consumed samples, the config, the tokenizer identity and the parameters' TP layout, so
resume checks and post-training tools read it without loading any tensor. Its ``tp_layout`` is
keyed by the plain GPT's parameter names whatever the pipeline layout; ``pipeline`` names the
stage boundaries. Every rank's RNG states (python, numpy, torch, CUDA and megatron-core's
model-parallel tracker) are in ``rng_rankNNNNN.pt``; QAT clip values are model parameters.
"""
import dataclasses
import glob
import json
import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_prep import load_tokenizer
from model.pipeline import to_gpt_name
from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.parallelize import is_pipeline

log = logging.getLogger("pretrain")
COMPLETE = "COMPLETE"
LATEST = "latest"
META = "meta.json"


def checkpoint_root(cfg: Config) -> str:
    return os.path.join(cfg.train.out_dir, "checkpoints")


def tokenizer_identity(cfg: Config) -> str | None:
    return load_tokenizer(cfg.data.tokenizer).sha256 if cfg.data.tokenizer else None


def tp_layout(model: torch.nn.Module) -> dict:
    """Plain-GPT parameter name -> the dim it is split along over TP ranks (None: replicated),
    for the whole model: pipeline stages contribute their layers (a collective)."""
    layout = {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
              for n, p in model.named_parameters()}
    if not is_pipeline(model):
        return layout
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, layout)
    layers = len(model._layer_specs) - 2
    return {to_gpt_name(n, layers): dim for stage in stages for n, dim in stage.items()}


def pipeline_layout(model: torch.nn.Module) -> dict | None:
    """Which pipeline layers each stage holds: stage s has layers parts[s] .. parts[s+1] - 1."""
    return {"num_layers": len(model._layer_specs), "parts": [int(p) for p in model.parts]} if is_pipeline(model) else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint named by ``latest``, else the newest complete one on disk."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if is_complete(path):
            return path
    complete = sorted(p for p in glob.glob(os.path.join(root, "step*")) if is_complete(p))
    return complete[-1] if complete else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def save(engine, trainer, cfg: Config, model: torch.nn.Module) -> str:
    """Save on every rank; returns the checkpoint path once it is complete."""
    root = checkpoint_root(cfg)
    tag = f"step{trainer.step:08d}"
    path = os.path.join(root, tag)
    client = {"iteration": trainer.step, "consumed_samples": trainer.consumed_samples,
              "skipped_steps": trainer.skipped_steps,
              "config": dataclasses.asdict(cfg), "tokenizer_sha256": tokenizer_identity(cfg),
              "tp_layout": tp_layout(model), "pipeline": pipeline_layout(model),
              "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
              "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size()}
    engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(path, META), "w") as f:
            json.dump(client, f, indent=1)
        with open(os.path.join(path, COMPLETE), "w") as f:
            json.dump({"iteration": trainer.step, "world_size": dist.get_world_size()}, f)
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, LATEST))
        _prune(root, cfg.checkpoint.keep)
    dist.barrier()
    log.info(f"saved checkpoint {path}")
    return path


def _prune(root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and the remains of crashed
    saves older than the newest complete one."""
    steps = sorted(glob.glob(os.path.join(root, "step*")))
    complete = [p for p in steps if is_complete(p)]
    stale = [p for p in steps if not is_complete(p) and p < complete[-1]]
    for old in stale + (complete[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def check_compatible(saved: dict, cfg: Config, path: str, pipeline: dict | None = None) -> None:
    """Refuse to resume into a different model, parallel layout (incl. the pipeline stage split,
    which the optimizer shards follow), tokenizer or data order; name each mismatch."""
    problems = []
    old = config_from_dict(saved["config"])
    for f in dataclasses.fields(old.model):
        a, b = getattr(old.model, f.name), getattr(cfg.model, f.name)
        if a != b and f.name != "dropout":
            problems.append(f"model.{f.name}: checkpoint {a!r}, config {b!r}")
    for key, now in (("tensor_parallel", parallel_state.get_tensor_model_parallel_world_size()),
                     ("pipeline_parallel", parallel_state.get_pipeline_model_parallel_world_size())):
        if saved[key] != now:
            problems.append(f"{key} size: checkpoint {saved[key]}, this run {now}")
    old_parts, parts = (saved.get("pipeline") or {}).get("parts"), (pipeline or {}).get("parts")
    if old_parts and parts and len(old_parts) == len(parts) and old_parts != parts:
        problems.append(f"pipeline stage boundaries (parallel.partition): checkpoint {old_parts}, "
                        f"this run {parts}")
    if saved["tokenizer_sha256"] != tokenizer_identity(cfg):
        problems.append(f"tokenizer: checkpoint sha256 {saved['tokenizer_sha256']}, "
                        f"data.tokenizer {cfg.data.tokenizer!r} has {tokenizer_identity(cfg)}")
    # The data order (megatron's shuffle) is a function of these: a change would repeat or skip samples.
    for name, a, b in (("train.seed", old.train.seed, cfg.train.seed),
                       ("train.steps x train.global_batch_size (samples the data order is built for)",
                        old.train.steps * old.train.global_batch_size, cfg.train.steps * cfg.train.global_batch_size),
                       ("data.paths", old.data.paths, cfg.data.paths), ("data.weights", old.data.weights, cfg.data.weights),
                       ("data.split", old.data.split, cfg.data.split)):
        if a != b:
            problems.append(f"{name}: checkpoint {a!r}, config {b!r} (the training data order would change)")
    if old.qat.enabled != cfg.qat.enabled or old.qat.layers != cfg.qat.layers:
        problems.append(f"qat: checkpoint enabled={old.qat.enabled} layers={old.qat.layers}, "
                        f"config enabled={cfg.qat.enabled} layers={cfg.qat.layers}")
    if problems:
        raise ConfigError(f"cannot resume from {path}:\n  " + "\n  ".join(problems))


def resume(engine, trainer, cfg: Config) -> str | None:
    """Load the checkpoint that ``checkpoint.resume`` names (auto | none | path); returns its path."""
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    path = latest_checkpoint(checkpoint_root(cfg)) if choice == "auto" else choice.rstrip("/")
    if path is None:
        return None
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise ConfigError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): refusing to load it")
    client = read_meta(path)
    check_compatible(client, cfg, path, pipeline_layout(engine.module))     # before DeepSpeed loads tensors into a mismatched model
    root, tag = os.path.split(path)
    load_path, _ = engine.load_checkpoint(root, tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    trainer.step, trainer.consumed_samples = client["iteration"], client["consumed_samples"]
    trainer.skipped_steps = client.get("skipped_steps", 0)
    rng = os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    else:   # saved with another DP size: the random streams do not map onto this world
        log.warning(f"{rng} missing (another world size): random streams start afresh")
    log.info(f"resumed from {path} at step {trainer.step} ({trainer.consumed_samples} samples consumed)")
    return path
