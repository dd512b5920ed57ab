"""Kurtosis regularization of linear-layer outputs.

Each selected linear gets a :class:`KurtosisPenalty` in its ``output_stat`` slot. It computes the
per-token kurtosis of the output (``kernels.token_kurtosis``; moments combined over the TP group
when the output is split by channels), reduces it over tokens, and attaches ``lambda x`` that to the
output so that its gradient enters backward right there. Attaching instead of returning the term
keeps the model's forward signature unchanged and works the same under pipeline parallelism,
where earlier stages never see the loss. The trainer sets the gradient scale the engine applies to
the main loss (loss scale / gradient accumulation steps) with :func:`set_grad_scale`.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import kernels

RESIDUAL_WRITERS = ("proj", "fc2")


@dataclass
class KurtosisConfig:
    """The `kurtosis:` section: penalize the per-token kurtosis of linear-layer outputs."""
    enabled: bool = False
    lambda_: float = 1e-3            # strength (YAML/CLI key: `lambda`); default measured in docs/benchmarks.md
    reduce: str = "mean"             # over tokens: mean | sum (sum makes lambda scale with the micro-batch)
    sites: str = "residual"          # residual: attention out-projection and MLP fc2 | all: every block linear
    eps: float = kernels.KURTOSIS_EPS  # kappa = m4 / (m2^2 + eps)

    def validate(self) -> None:
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"kurtosis.reduce must be 'mean' or 'sum', got {self.reduce!r}")
        if self.sites not in ("residual", "all"):
            raise ValueError(f"kurtosis.sites must be 'residual' or 'all', got {self.sites!r}")
        if self.lambda_ < 0:
            raise ValueError(f"kurtosis.lambda must be >= 0, got {self.lambda_}")


_grad_scale = 1.0


def set_grad_scale(scale: float) -> None:
    """The factor the engine applies to the main loss before backward (loss scale / accumulation)."""
    global _grad_scale
    _grad_scale = float(scale)


class _AttachLoss(torch.autograd.Function):
    """Returns y; in backward, also feeds d(loss) = the engine's grad scale into ``loss``."""

    @staticmethod
    def forward(ctx, y, loss):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full((), _grad_scale, device=g.device, dtype=torch.float32)


class KurtosisPenalty(torch.nn.Module):
    """lambda * reduce_t(kappa_t) on one linear layer's output."""

    def __init__(self, cfg: KurtosisConfig, split_channels: bool, split_tokens: bool):
        super().__init__()
        self.lam, self.reduce, self.eps = cfg.lambda_, cfg.reduce, cfg.eps
        self.split_channels, self.split_tokens = split_channels, split_tokens
        self.kurtosis_sum = None             # detached sum of kappa over this rank's tokens, for logging
        self.tokens = 0

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group() if self.split_channels else None
        kappa = kernels.token_kurtosis(y, eps=self.eps, group=group)
        total = kappa.sum()
        tokens = kappa.numel() * (parallel_state.get_tensor_model_parallel_world_size() if self.split_tokens else 1)
        penalty = self.lam * (total / tokens if self.reduce == "mean" else total)
        self.kurtosis_sum, self.tokens = total.detach(), tokens
        return _AttachLoss.apply(y, penalty)

    def last_mean(self) -> torch.Tensor | None:
        """Mean kurtosis over this layer's tokens in the last forward (over the TP group when the
        tokens are split); a collective when they are, so call it on every TP rank."""
        if self.kurtosis_sum is None:
            return None
        total = self.kurtosis_sum.clone()
        if self.split_tokens:
            dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        return total / self.tokens

    def penalty(self, mean: torch.Tensor) -> torch.Tensor:
        """The penalty term that a mean kurtosis (from :meth:`last_mean`) stands for."""
        return self.lam * (mean * self.tokens if self.reduce == "sum" else mean)


def attach_kurtosis(model: torch.nn.Module, cfg: KurtosisConfig) -> list[KurtosisPenalty]:
    """Give every selected block linear a kurtosis penalty; returns them (empty when off)."""
    from model.gpt import linears

    if not cfg.enabled:
        return []
    tp = parallel_state.get_tensor_model_parallel_world_size()
    penalties = []
    for name, linear in linears(model):
        short = name.rsplit(".", 1)[-1]
        if short == "output" or (cfg.sites == "residual" and short not in RESIDUAL_WRITERS):
            continue
        column = linear.parallel == "column"
        linear.output_stat = KurtosisPenalty(
            cfg, split_channels=column and tp > 1,
            split_tokens=not column and tp > 1 and linear.linear.sequence_parallel)
        penalties.append(linear.output_stat)
    return penalties
