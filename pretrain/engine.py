"""The DeepSpeed engine: ZeRO, mixed precision, gradient clipping and accumulation, from our config."""
import functools
import math

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import is_model_parallel_parameter
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.runtime.zero.utils import get_norm_dtype

from pretrain.config import Config, OptimConfig
from pretrain.parallel_dims import MegatronMPU, ParallelDims
from pretrain.parallelize import is_pipeline


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices and embeddings only; clip values in their own group with no
    weight decay and no momentum (beta1 = 0), at the same learning rate."""
    decay, no_decay, clips = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "is_clip", False):
            clips.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": clips, "weight_decay": 0.0, "betas": (0.0, cfg.beta2)}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr over decay_steps, then flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps or max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def clips_in_adamw(cfg: Config, dims: ParallelDims) -> bool:
    """bf16 under ZeRO-1/2 without pipeline (DeepSpeed's ZeRO optimizer at loss scale 1): AdamW
    clips and checks finiteness from DeepSpeed's gradient norm. Elsewhere DeepSpeed clips (fp16's
    loss scale, ZeRO-0's and the pipeline's BF16_Optimizer)."""
    return cfg.train.bf16 and cfg.parallel.zero_stage in (1, 2) and dims.pp == 1


def deepspeed_config(cfg: Config, dims: ParallelDims) -> dict:
    t = cfg.train
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation(dims.dp),
        "gradient_clipping": 0.0 if clips_in_adamw(cfg, dims) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,   # torch's (fused) AdamW under ZeRO
        # no per-gradient overflow check in bf16 (an amax/amin/isfinite per parameter and a host sync,
        # most of the step's host time, issue 13): AdamW below skips a step with a non-finite
        # gradient on every rank together (from DeepSpeed's global norm under ZeRO-1/2, inf then)
        "bf16": {"enabled": t.bf16, "check_grad_overflow": False},
        "fp16": {"enabled": t.fp16, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if t.bf16 and dims.pp > 1:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}   # bf16 + pipeline + ZeRO-1 needs it
    return ds


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW that skips the update when any rank holds a non-finite gradient (what a
    non-finite loss leaves), so one bad batch cannot poison the weights. Every rank calls step()
    together (ZeRO partitions, pipeline stages), so the check is one world-wide all-reduce and a
    host read.

    With ``clip_by`` set (bf16 under ZeRO-1/2, `clips_in_adamw`), DeepSpeed has already all-reduced
    the global gradient norm when it calls step(), once per parameter group: it is inf exactly when
    some gradient on some rank is not finite. Clipping by it here (DeepSpeed's own clipping is off)
    and handing the fused kernel its finiteness as ``found_inf`` (which skips the update and the
    step count on the GPU) leaves the host nothing to wait for: the check and DeepSpeed's
    per-group test of the norm cost 6 host syncs a step (issue 13). The arithmetic is DeepSpeed's
    ``unscale_and_clip_grads`` at loss scale 1, so the clipped gradient is the same bit for bit."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.clip_by = None       # (max norm, () -> DeepSpeed's global gradient norm tensor), from build_engine
        self.nonfinite = None     # 1. (a device tensor) when the last step() skipped for a non-finite gradient; the trainer counts it

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.clip_by is not None:
            max_norm, global_norm = self.clip_by
            norm = global_norm()
            self.nonfinite = self.found_inf = (~torch.isfinite(norm)).float()
            if max_norm > 0:
                clip = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
                torch._foreach_mul_(grads, 1.0 / clip)
            return super().step(closure)
        bad = torch.zeros(1, device=grads[0].device if grads else "cpu")
        if grads:
            bad += ~all_finite(grads)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.nonfinite = bad
        return None if bad.item() else super().step(closure)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether no tensor holds a nan or inf, as a bool tensor on the first one's device. Read from
    the max |x| of each (nan or inf exactly when it holds one; unlike a 2-norm it cannot overflow
    for finite values), one fused foreach kernel per (device, dtype) rather than an isfinite pass
    per parameter, whose launches dominated the step's host time (issue 13). Empty tensors, which
    have no max, are finite."""
    groups = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(ts, float("inf")))).all().to(device)
             for ts in groups.values()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def fused_grad_norm(zero: DeepSpeedZeroOptimizer, gradients, params, norm_type=2):
    """DeepSpeed's ZeRO-1/2 ``get_grad_norm_direct`` for the 2-norm its step takes, with the
    per-gradient work in one foreach kernel and no host read. The same gradients count (a
    pipeline-replicated one once, one not split over TP on TP rank 0 only), each norm accumulates
    in DeepSpeed's norm dtype (fp64 on GPUs) without its fp64 copy of every gradient, the same
    all-reduces follow, and a non-finite total becomes its -1 without its ``masked_fill_``, whose
    tensor fill value is read back to the host (a sync per parameter group, issue 13)."""
    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, gradients, params, norm_type)
    unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g for g, p in zip(unpadded, params)   # gradients: nothing to detach
               if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
               and (is_model_parallel_parameter(p) or zero.model_parallel_rank == 0)]
    if counted:
        norms = torch._foreach_norm(counted, 2.0, dtype=get_norm_dtype())
        total = torch.stack(norms).to(zero.device).pow(2.0).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=zero.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=zero.dp_process_group)
    zero._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    return torch.where(torch.isfinite(total), total, -1.0)


def set_lr(engine, step: int, cfg: Config) -> None:
    """The learning rate is a function of the step alone, so skipped steps and resumes cannot
    shift the schedule."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg.optim, cfg.train.steps)


def build_engine(model: torch.nn.Module, cfg: Config, dims: ParallelDims):
    """deepspeed.initialize over our model and AdamW (the trainer sets the LR each step). TP/DP groups come from megatron-core;
    a pipeline model brings DeepSpeed's grid over the same topology instead (checked to agree)."""
    o = cfg.optim
    optimizer = AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims),
                                           mpu=None if is_pipeline(model) else MegatronMPU())
    if isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        engine.optimizer.get_grad_norm_direct = functools.partial(fused_grad_norm, engine.optimizer)
    if clips_in_adamw(cfg, dims):
        zero = engine.optimizer
        if not isinstance(zero, DeepSpeedZeroOptimizer):
            raise RuntimeError(f"bf16 under ZeRO-{cfg.parallel.zero_stage} expected DeepSpeed's ZeRO optimizer, "
                               f"got {type(zero).__name__}: gradient clipping would be off")
        optimizer.clip_by = (o.grad_clip, lambda: zero._global_grad_norm)
    return engine


def loss_scale(engine) -> float:
    """The engine's current (dynamic) loss scale; 1 without fp16."""
    return float(getattr(engine.optimizer, "cur_scale", 1.0)) if engine.fp16_enabled() else 1.0
