"""A checkpoint as a post-training model, and the start-up and exit of the post-training command lines.

Checkpoints are read by pretrain.reshard.load_checkpoint (the reader beside pretrain.checkpoint's
writer): every problem with one is a CheckpointError, which :func:`run_cli` turns into the one line
and exit status 2 of pretrain.train.
"""
import logging
import sys

import torch

from pretrain.checkpoint import CheckpointError
from pretrain.reshard import Checkpoint


def model_from_checkpoint(ckpt: Checkpoint, device="cpu") -> torch.nn.Module:
    """The TP=1 GPT of the checkpoint in eval mode, QAT input quantizers attached (and loaded)
    when it was trained with them; the kurtosis regularizer is a training-only loss and left off.
    parallel_state must be initialized with TP=1 (pretrain.parallel_dims.init_distributed)."""
    from megatron.core import parallel_state

    from model.gpt import build_gpt
    from qat.quantizer import attach_qat

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("post-training runs the full model on every rank: use parallel.tensor=1")
    model = build_gpt(ckpt.config.model)
    attach_qat(model, ckpt.config.qat)
    model.load_state_dict(ckpt.state)
    return model.to(device).eval()


def start_cli() -> torch.device:
    """What each post-training command does once its input is checked: INFO logs (WARNING on ranks
    other than 0, whose lines would repeat rank 0's), the process groups at TP=1, and its device."""
    from pretrain.parallel_dims import ParallelConfig, init_distributed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    init_distributed(ParallelConfig())
    if torch.distributed.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
