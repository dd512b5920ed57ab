"""Read a training checkpoint of any parallel layout as one full (TP=1) model, for post-training.

Every problem with the checkpoint (a path that does not exist, no complete checkpoint under it,
an incomplete, damaged or foreign one) is a CheckpointError; :func:`run_cli` turns it into the one
line and exit status 2 of pretrain.train.

The tensors are consolidated from the DeepSpeed files alone, by pretrain.reshard (the same
consolidation a resume under another layout uses): TP shards merged by meta.json's ``tp_layout``,
pipeline layer files mapped to the GPT's names. No parallel model is built for this.
"""
import os
import sys
from typing import NamedTuple

import torch

from pretrain.checkpoint import COMPLETE, META, CheckpointError, is_complete, latest_checkpoint, read_meta, verify
from pretrain.config import Config, ConfigError, config_from_dict
from pretrain.reshard import merge_tp, model_files, model_shards


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
