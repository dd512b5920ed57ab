"""Small end-to-end training runs for the equivalence tests: build the model under a parallel
layout, load one shared full state, record gradients and a loss trajectory."""
import torch
from megatron.core import parallel_state

from model.pipeline import to_gpt_name, to_pipeline_name
from model.sharding import gather_state_dict, shard_state_dict
from pretrain.config import config_from_dict
from pretrain.engine import build_engine
from pretrain.parallel_dims import init_distributed
from pretrain.parallelize import build_model, is_pipeline
from pretrain.trainer import Trainer
from qat.quantizer import attach_qat
from qat.kurtosis import attach_kurtosis, set_grad_scale

TINY = {
    "model": {"vocab_size": 96, "seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "grad_clip": 0.3},  # clipping active
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 4},
    "parallel": {"zero_stage": 1},
}


def merged(base: dict, over: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in over.items():
        out.setdefault(k, {}).update(v)
    return out


def global_samples(cfg, n_samples: int, seed: int = 0) -> torch.Tensor:
    """Learnable sequences: a random start and stride, then each token is the last plus the stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(cfg.model.vocab_size, (n_samples, 1), generator=g)
    stride = torch.randint(1, 4, (n_samples, 1), generator=g)
    return (start + stride * torch.arange(cfg.model.seq_length + 1)) % cfg.model.vocab_size


def rank_micro_batches(samples: torch.Tensor, micro: int):
    """This DP rank's micro-batches: each run of micro x DP consecutive samples is split by DP rank."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    for start in range(0, len(samples) - micro * dp + 1, micro * dp):
        chunk = samples[start + rank * micro: start + (rank + 1) * micro]
        yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:]}


def build(overrides: dict):
    cfg = config_from_dict(merged(TINY, overrides))
    dims = init_distributed(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dims)
    quantizers, penalties = attach_qat(model, cfg.qat), attach_kurtosis(model, cfg.kurtosis)
    return cfg, dims, model, quantizers, penalties


def gpt_names(model, state: dict) -> dict:
    """A state keyed like the plain GPT's, whatever layout ``model`` has."""
    if not is_pipeline(model):
        return state
    layers = len(model._layer_specs) - 2
    return {to_gpt_name(n, layers): t for n, t in state.items()}


def load_full_state(model, full: dict) -> None:
    """Load a full (TP=1, plain GPT names) state into this rank's shard or pipeline stage."""
    if is_pipeline(model):
        layers = len(model._layer_specs) - 2
        full = {to_pipeline_name(n, layers): t for n, t in full.items()}
    model.load_state_dict(shard_state_dict(full, model), strict=False)


def initial_state(overrides: dict) -> dict:
    """The initial state of the configured model, full over TP, in GPT names (a pipeline stage
    returns its own layers)."""
    _, _, model, _, _ = build(overrides)
    return gpt_names(model, gather_state_dict(model))


def run(overrides: dict, full_state: dict, steps: int) -> dict:
    """Full gradients of the first micro-batch (plain autograd, before any step; not under pipeline
    parallelism, where no rank holds the whole forward), then the DP-averaged loss of each of
    ``steps`` DeepSpeed steps and this rank's final parameters (full over TP, GPT names)."""
    cfg, dims, model, quantizers, penalties = build(overrides)
    load_full_state(model, full_state)
    samples = global_samples(cfg, steps * cfg.train.global_batch_size)

    grads = None
    if not is_pipeline(model):
        first = next(rank_micro_batches(samples, cfg.train.micro_batch_size))
        set_grad_scale(1.0)
        model(first["tokens"], first["labels"]).backward()
        grads = gather_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)

    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    batches = rank_micro_batches(samples, cfg.train.micro_batch_size)
    losses, norms = [], []
    for _ in range(steps):
        trainer.train_step(batches)
        metrics, _ = trainer.interval_metrics()
        losses.append(metrics["train/loss"])
        norms.append(metrics["train/grad_norm"])
    return {"grads": grads, "losses": losses, "grad_norms": norms, "final": gpt_names(model, gather_state_dict(model))}
