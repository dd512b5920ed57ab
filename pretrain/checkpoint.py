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

A checkpoint counts only once every rank has written its files (a barrier), they are fsynced and
rank 0 has written COMPLETE, which holds each file's size and xxh3-128 digest (the ranks hash the
files between them); ``latest`` is updated after that, so a crash mid-save leaves the previous
checkpoint as the one to resume from. Loading verifies the digests first; ``--resume auto`` falls
back to the newest checkpoint that verifies. A complete step directory is never written again.
Nothing is unpickled: every file loads with ``torch.load(weights_only=True)`` (DeepSpeed's
through :class:`SafeCheckpointEngine`), the few DeepSpeed classes its optimizer files hold
allow-listed (SAFE_GLOBALS). meta.json (also DeepSpeed's client state) holds the
iteration, consumed samples, the config, the tokenizer identity and the parameters' TP layout, so
resume checks and post-training tools read it without loading any tensor. Its ``tp_layout`` is
keyed by the plain GPT's parameter names whatever the pipeline layout; ``pipeline`` names the
stage boundaries. Every rank's RNG states (python, numpy, torch, CUDA and megatron-core's
model-parallel tracker) are in ``rng_rankNNNNN.pt`` as tensors and plain numbers; QAT clip
values are model parameters. A checkpoint of another parallel layout resumes only with
``checkpoint.reshard`` (pretrain.reshard re-splits its state; the RNG states are left out).
"""
import dataclasses
import fcntl
import glob
import json
import logging
import os
import random
import shutil
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import xxhash
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from megatron.core import parallel_state

from data_prep.tokenizer import load_tokenizer
from model.pipeline import to_gpt_name
from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.parallelize import is_pipeline

log = logging.getLogger("pretrain")
COMPLETE = "COMPLETE"
LATEST = "latest"
RUN_LOCK = "RUN_LOCK"
META = "meta.json"
# What DeepSpeed's model and optimizer files hold besides tensors and containers (ZeRO 0-2, bf16/fp16,
# pipeline): plain classes whose unpickling runs no code of the file's choosing.
SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
_CHUNK = 16 << 20


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, truncated, or holding more than
    tensors. Every command line says ``checkpoint error: ...`` and exits 2 (quant.load.run_cli)."""


def load_file(path: str, map_location="cpu", mmap: bool = False):
    """torch.load that unpickles nothing but tensors, containers and SAFE_GLOBALS (``mmap``: the
    tensors stay in the file's pages, shared by the ranks that all read it)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:   # UnpicklingError for foreign objects; RuntimeError for a broken zip
        raise CheckpointError(f"refusing to load {path}: {str(e).splitlines()[0]}") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading through :func:`load_file`."""

    def load(self, path: str, map_location=None):
        return load_file(path, map_location)


def _digest(path: str) -> dict:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        os.fsync(f.fileno())           # on disk before COMPLETE says so
    return {"size": os.path.getsize(path), "xxh3_128": h.hexdigest()}


def _files(path: str) -> list[str]:
    """The step directory's files (relative names), without COMPLETE."""
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(n for n in out if n != COMPLETE)


def _share(items: list, distributed: bool) -> list:
    """This rank's part of a list the ranks work through together."""
    if not distributed:
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _gather(part: dict, distributed: bool) -> dict:
    if not distributed:
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str, names: list[str] | None = None, distributed: bool = True) -> list[str]:
    """Problems of a complete checkpoint against the sizes and digests in its COMPLETE (all of
    its files, or ``names``); the ranks share the hashing when ``distributed``. [] = it verifies
    (also for a checkpoint written before digests were recorded)."""
    with open(os.path.join(path, COMPLETE)) as f:
        manifest = json.load(f).get("files")
    if manifest is None:
        return []
    problems = {}
    wanted = sorted(manifest) if names is None else names
    for name in wanted:
        file = os.path.join(path, name)
        if name not in manifest:
            problems[name] = f"{name} is not in its manifest"
        elif not os.path.isfile(file):
            problems[name] = f"{name} is missing"
        elif os.path.getsize(file) != manifest[name]["size"]:
            problems[name] = f"{name} has {os.path.getsize(file)} bytes, {manifest[name]['size']} were written"
    for name in _share([n for n in wanted if n not in problems], distributed and dist.is_initialized()):
        if _digest(os.path.join(path, name))["xxh3_128"] != manifest[name]["xxh3_128"]:
            problems[name] = f"{name} does not match its digest (corrupted)"
    problems = _gather(problems, distributed and dist.is_initialized())
    return [problems[n] for n in sorted(problems)]


class RunLock:
    """One training job per run directory: rank 0 holds an exclusive flock on OUT_DIR/RUN_LOCK for
    the run's life (the kernel drops it when the process dies, however it dies); the file names the
    holder, so a second job is refused naming it, and a dead holder's leftover is reported."""

    def __init__(self, out_dir: str):
        self.path, self.fd = os.path.join(out_dir, RUN_LOCK), None

    def acquire(self) -> str | None:
        """None once held, else why not (the holder)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"run directory {os.path.dirname(self.path)} is in use by another training job ({holder or 'unknown'}); "
                    f"stop it first, or use another train.out_dir")
        if holder:
            log.warning(f"{self.path}: its last holder ({holder}) ended without releasing it; taking over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)        # an empty file: released cleanly
            os.close(self.fd)
            self.fd = None


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
    """Every generator's state as tensors and plain numbers (loadable without unpickling)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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


def saved_layout(path: str, meta: dict) -> dict:
    """The parallel sizes a complete checkpoint was written under (DP from COMPLETE's world size)."""
    with open(os.path.join(path, COMPLETE)) as f:
        world = json.load(f)["world_size"]
    tp, pp = meta["tensor_parallel"], meta["pipeline_parallel"]
    return {"tensor": tp, "pipeline": pp, "data": world // (tp * pp)}


def save(engine, trainer, cfg: Config, model: torch.nn.Module) -> str:
    """Save on every rank; returns the checkpoint path once it is complete. A complete checkpoint
    of this step is kept as it is (a relaunch must not rewrite it); the remains of a crashed save of
    this step are removed first."""
    root = checkpoint_root(cfg)
    tag = f"step{trainer.step:08d}"
    path = os.path.join(root, tag)
    if is_complete(path):
        log.info(f"checkpoint {path} exists and is complete: not written again")
        return path
    if dist.get_rank() == 0 and os.path.isdir(path):
        shutil.rmtree(path)
    dist.barrier()
    client = {"iteration": trainer.step, "consumed_samples": trainer.consumed_samples,
              "skipped_steps": trainer.skipped_steps,
              "config": dataclasses.asdict(cfg), "tokenizer_sha256": tokenizer_identity(cfg),
              "tp_layout": tp_layout(model), "pipeline": pipeline_layout(model),
              "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
              "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size()}
    engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt"))
    if dist.get_rank() == 0:
        with open(os.path.join(path, META), "w") as f:
            json.dump(client, f, indent=1)
    dist.barrier()
    files = _gather({n: _digest(os.path.join(path, n)) for n in _share(_files(path), True)}, True)
    if dist.get_rank() == 0:
        with open(os.path.join(path, COMPLETE), "w") as f:
            json.dump({"iteration": trainer.step, "world_size": dist.get_world_size(),
                       "files": {n: files[n] for n in sorted(files)}}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, LATEST))
        _fsync_dir(root)
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


def check_compatible(saved: dict, cfg: Config, path: str, layout: dict, pipeline: dict | None = None) -> bool:
    """Refuse to resume into a different model, tokenizer or data order, and into another parallel
    layout (TP, PP or DP size, pipeline stage split: the shards follow them) unless
    ``checkpoint.reshard`` is on; name each mismatch. ``layout``: the checkpoint's
    :func:`saved_layout`. Returns whether the layout differs, so the state must be resharded."""
    problems = []
    old = config_from_dict(saved["config"])
    for f in dataclasses.fields(old.model):
        a, b = getattr(old.model, f.name), getattr(cfg.model, f.name)
        if a != b and f.name != "dropout":
            problems.append(f"model.{f.name}: checkpoint {a!r}, config {b!r}")
    now = {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
           "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
           "data": parallel_state.get_data_parallel_world_size()}
    what = {"tensor": "tensor-parallel size (parallel.tensor)", "pipeline": "pipeline-parallel size (parallel.pipeline)",
            "data": "data-parallel size (world size / (parallel.tensor x parallel.pipeline))"}
    moved = [f"{what[k]}: checkpoint {layout[k]}, this run {now[k]}" for k in what if layout[k] != now[k]]
    old_parts, parts = (saved.get("pipeline") or {}).get("parts"), (pipeline or {}).get("parts")
    if old_parts and parts and len(old_parts) == len(parts) and old_parts != parts:
        moved.append(f"pipeline stage boundaries (parallel.partition): checkpoint {old_parts}, this run {parts}")
    refused = moved and not cfg.checkpoint.reshard
    if refused:
        problems += moved
    elif moved and 0 in (old.parallel.zero_stage, cfg.parallel.zero_stage):
        problems.append(f"checkpoint.reshard re-splits DeepSpeed's ZeRO fp32 partitions and needs ZeRO stage 1 or 2: "
                        f"parallel.zero_stage checkpoint {old.parallel.zero_stage}, config {cfg.parallel.zero_stage}")
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
    if refused:
        problems.append("(a checkpoint of another parallel layout resumes only with --checkpoint.reshard true, "
                        "which re-splits its model and optimizer state)")
    if problems:
        raise ConfigError(f"cannot resume from {path}:\n  " + "\n  ".join(problems))
    return bool(moved)


def _candidates(root: str) -> list[str]:
    """Complete checkpoints, the one ``latest`` names first, then newest first."""
    newest = latest_checkpoint(root)
    others = sorted((p for p in glob.glob(os.path.join(root, "step*")) if is_complete(p) and p != newest), reverse=True)
    return ([newest] if newest else []) + others


def _verified(cfg: Config) -> str | None:
    """The checkpoint to resume from: ``checkpoint.resume``'s path if it verifies; under auto the
    newest complete one that verifies (each one skipped is named, with why)."""
    choice = cfg.checkpoint.resume
    if choice != "auto":
        path = choice.rstrip("/")
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): refusing to load it")
        problems = verify(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
        return path
    candidates = _candidates(checkpoint_root(cfg))
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path
        aside = os.path.join(os.path.dirname(path), "damaged-" + os.path.basename(path))
        log.warning(f"skipping checkpoint {path}: {'; '.join(problems)} (moved to {aside}, kept for inspection)")
        dist.barrier()                 # every rank has verified it before it moves
        if dist.get_rank() == 0:       # out of the way of resumes, pruning and this step's next save
            os.rename(path, aside)
        dist.barrier()
    if candidates:
        raise CheckpointError(f"no checkpoint under {checkpoint_root(cfg)} verifies (all {len(candidates)} are "
                              f"damaged; see the warnings): refusing to start over in this directory")
    return None


def resume(engine, trainer, cfg: Config) -> str | None:
    """Load the checkpoint that ``checkpoint.resume`` names (auto | none | path), verified; returns its path."""
    if cfg.checkpoint.resume == "none":
        return None
    path = _verified(cfg)
    if path is None:
        return None
    client = read_meta(path)
    layout = saved_layout(path, client)
    # checked before any tensor is loaded into a mismatched model
    if check_compatible(client, cfg, path, layout, pipeline_layout(engine.module)):
        from pretrain.reshard import load_resharded   # here: pretrain.reshard imports this module
        load_resharded(engine, path, client)
        if dist.get_rank() == 0:
            log.warning(f"resharded {path} from TP {layout['tensor']} x PP {layout['pipeline']} x DP {layout['data']} "
                        f"to TP {cfg.parallel.tensor} x PP {cfg.parallel.pipeline} x DP "
                        f"{parallel_state.get_data_parallel_world_size()}: the random streams (dropout masks) are "
                        f"per rank and cannot continue under another layout; they start afresh from train.seed")
    else:
        root, tag = os.path.split(path)
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
        load_path, _ = engine.load_checkpoint(root, tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        _set_rng_state(load_file(os.path.join(path, f"rng_rank{dist.get_rank():05d}.pt")))
    trainer.step, trainer.consumed_samples = client["iteration"], client["consumed_samples"]
    trainer.skipped_steps = client.get("skipped_steps", 0)
    log.info(f"resumed from {path} at step {trainer.step} ({trainer.consumed_samples} samples consumed)")
    return path
