"""Kurtosis regularization of linear-layer outputs.

Each selected linear gets a :class:`KurtosisPenalty` in its ``output_stat`` slot. It returns the
output unchanged and adds ``d(lambda x reduce_t(kappa_t))/dy`` to the output's gradient in backward
(moments combined over the TP group when the output is split by channels), so the penalty's
gradient enters backward right there without a loss term: the model's forward signature is
unchanged and it works the same under pipeline parallelism, where earlier stages never see the
loss. Per site and step that is one kernel in backward that reads y and the incoming gradient,
forms the token's moments from the row it holds and writes the sum of the two gradients
(``kernels.kurtosis.token_kurtosis_grad``); the moments kernel runs in forward only where kappa is
logged (``record_stats``; the backward still forms its own, so logging leaves the gradient's bits
alone) or the channels are split over TP ranks (its all-reduces). The
trainer sets the gradient scale the engine applies to the main loss (loss scale / gradient
accumulation steps) with :func:`set_grad_scale` before the step's forwards, which read it.
"""
import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kernels.kurtosis import token_kurtosis_grad, token_kurtosis_stats
from qat.config import KurtosisConfig

RESIDUAL_WRITERS = ("proj", "fc2")


_grad_scale = 1.0


def set_grad_scale(scale: float) -> None:
    """The factor the engine applies to the main loss before backward (loss scale / accumulation);
    the forwards after this call use it."""
    global _grad_scale
    _grad_scale = float(scale)


class _Penalize(torch.autograd.Function):
    """Returns y; backward returns the incoming gradient plus the penalty's, from one kernel.
    Saved: y, and five fp32 numbers per token when the forward computed them (stats None: the
    backward kernel does). No side effects, so torch.compile traces it (the kernels inside are
    custom ops there); the gradient scale is read in forward, where a compiled graph guards on it."""

    @staticmethod
    def forward(ctx, y, stats, g_kappa, eps):
        ctx.save_for_backward(y, stats)
        ctx.g_kappa, ctx.eps = g_kappa, eps
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        y, stats = ctx.saved_tensors
        return token_kurtosis_grad(y, stats, ctx.g_kappa, grad_out=g, eps=ctx.eps), None, None, None


class KurtosisPenalty(torch.nn.Module):
    """lambda * reduce_t(kappa_t) on one linear layer's output."""

    def __init__(self, cfg: KurtosisConfig, split_channels: bool, split_tokens: bool):
        super().__init__()
        self.lambda_, self.reduce, self.eps = cfg.lambda_, cfg.reduce, cfg.eps
        self.split_channels, self.split_tokens = split_channels, split_tokens
        self.record_stats = False            # set by the trainer on log steps
        self.kurtosis_sum = None             # detached sum of kappa over this rank's tokens, when recorded
        self.tokens = 0

    def channel_all_reduce(self):
        """The sum over the TP group when this output holds a slice of the channels on more than one
        rank (what token_kurtosis_stats combines the moments with), else None."""
        group = parallel_state.get_tensor_model_parallel_group() if self.split_channels else None
        if group is None or dist.get_world_size(group) == 1:
            return None
        return functools.partial(dist.all_reduce, group=group)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not ((torch.is_grad_enabled() and y.requires_grad) or self.record_stats):
            return y                         # evaluation: nothing to penalize or log
        all_reduce = self.channel_all_reduce()
        stats = None                         # whole tokens: the backward kernel forms them from y
        if self.record_stats or all_reduce is not None:
            kappa, tp_stats = token_kurtosis_stats(y, eps=self.eps, all_reduce=all_reduce)
            if all_reduce is not None:       # split channels: only the forward can all-reduce them
                stats = tp_stats
        self.kurtosis_sum = kappa.sum() if self.record_stats else None
        self.tokens = y.numel() // y.shape[-1] * (parallel_state.get_tensor_model_parallel_world_size()
                                                  if self.split_tokens else 1)
        lambda_per_kappa = self.lambda_ / self.tokens if self.reduce == "mean" else self.lambda_
        return _Penalize.apply(y, stats, lambda_per_kappa * _grad_scale, self.eps)

    def last_mean(self) -> torch.Tensor | None:
        """Mean kurtosis over this layer's tokens in the last forward (over the TP group when the
        tokens are split), or None unless record_stats is on; a collective when the tokens are
        split, so call it on every TP rank."""
        if not self.record_stats or self.kurtosis_sum is None:
            return None
        total = self.kurtosis_sum.clone()
        if self.split_tokens:
            dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        return total / self.tokens

    def penalty(self, mean: torch.Tensor) -> torch.Tensor:
        """The penalty term that a mean kurtosis (from :meth:`last_mean`) stands for."""
        return self.lambda_ * (mean * self.tokens if self.reduce == "sum" else mean)


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
