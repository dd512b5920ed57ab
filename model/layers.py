"""Building blocks of the GPT: the one linear-layer type, norms and rotary embeddings.

Every linear layer of the model is a :class:`Linear`: a megatron-core column- or row-parallel
layer with two attachment points that the QAT issue fills:

* ``input_quant``: a module with ``run(linear, x)`` that quantizes the input and calls the layer
  (QAT fake quantization with learned clips, see ``qat.quantizer``; evaluation-time quantizers, see
  ``quant.convert``). When its ``fuse_into_producer`` is true, the producer of the input (a norm,
  the MLP activation) applies it in its own kernel (``quantize_norm`` / ``quantize_act``);
* ``output_stat``: a module called on the output that returns it (the kurtosis regularizer).

Both are ``None`` by default and then the forward is the bare megatron layer.
"""
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

ROPE_BASE = 10000.0   # rotary frequency base (theta); quant.export writes it into Hugging Face configs


def mark_tp_grad_sync(param: torch.nn.Parameter) -> None:
    """Mark a parameter that is replicated over the TP group but sees only part of the data on
    each rank (norm gains under sequence parallelism, row-parallel biases, clip values of
    TP-split inputs). Such a parameter must be used through :func:`tp_grad_sync` so its gradient
    is summed over the TP group. Megatron's ``sequence_parallel`` attribute carries the mark, so
    checkpoint tooling and megatron utilities read the same flag."""
    param.sequence_parallel = True


def tp_grad_sync(param: torch.Tensor) -> torch.Tensor:
    """Identity in forward; all-reduce of the gradient over the TP group in backward, for
    parameters marked with :func:`mark_tp_grad_sync`."""
    if getattr(param, "sequence_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return copy_to_tensor_model_parallel_region(param)
    return param


class Linear(torch.nn.Module):
    """A linear layer split over the TP group: ``parallel="column"`` splits the output features
    (input replicated, or sequence-sharded under sequence parallelism), ``parallel="row"`` splits
    the input features (output summed over the group, or reduce-scattered under SP)."""

    def __init__(self, in_features: int, out_features: int, *, parallel: str, bias: bool,
                 init_std: float, mp_config):
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        self.parallel = parallel
        init = lambda w: torch.nn.init.normal_(w, mean=0.0, std=init_std)  # noqa: E731
        if parallel == "column":
            self.linear = tensor_parallel.ColumnParallelLinear(
                in_features, out_features, config=mp_config, init_method=init, bias=bias,
                gather_output=False, skip_bias_add=False)
        else:
            # The bias is added here, not inside megatron, so its gradient can be synced under SP.
            self.linear = tensor_parallel.RowParallelLinear(
                in_features, out_features, config=mp_config, init_method=init, bias=bias,
                input_is_parallel=True, skip_bias_add=True)
            if bias and mp_config.sequence_parallel:
                mark_tp_grad_sync(self.linear.bias)
        self.input_quant = None
        self.output_stat = None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def splits_input(self) -> bool:
        """True when each TP rank sees only part of this layer's input elements (row-parallel
        inputs are split along features; column-parallel inputs under SP along tokens)."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return tp > 1 and (self.parallel == "row" or self.linear.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is None:
            y, bias = self.linear(x.contiguous())
        else:
            y, bias = self.input_quant.run(self.linear, x)
        if bias is not None:
            y = y + tp_grad_sync(bias)
        if self.output_stat is not None:
            y = self.output_stat(y)
        return y


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm over the last dim. ``fp32=True`` computes in fp32 whatever the
    activation dtype (fp16 training needs it to converge)."""

    def __init__(self, dim: int, kind: str, bias: bool, fp32: bool, eps: float, sequence_parallel: bool):
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
        self.kind, self.fp32, self.eps = kind, fp32, eps
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None
        if sequence_parallel:
            for p in self.parameters():
                mark_tp_grad_sync(p)

    def forward(self, x: torch.Tensor, quant=None) -> torch.Tensor:
        """quant: the input quantizer of the linear this norm feeds; when active, the output comes
        fake-quantized from the same kernel."""
        w = tp_grad_sync(self.weight)
        b = tp_grad_sync(self.bias) if self.bias is not None else None
        if quant is not None and quant.fuse_into_producer:
            return quant.quantize_norm(x, w, b, self.eps, self.kind)
        if self.fp32:
            return norm(x.float(), w.float(), b.float() if b is not None else None, self.eps, self.kind).to(x.dtype)
        return norm(x, w, b, self.eps, self.kind)


def norm(x, weight, bias, eps: float, kind: str) -> torch.Tensor:
    """LayerNorm or RMSNorm of x over its last dim."""
    if kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def activation(a: torch.Tensor, kind: str) -> torch.Tensor:
    """The MLP nonlinearity: tanh-GELU, or SwiGLU over interleaved (gate, up) pairs."""
    if kind == "swiglu":
        gate, up = a.unflatten(-1, (-1, 2)).unbind(-1)
        return F.silu(gate) * up
    return F.gelu(a, approximate="tanh")


def rope_cache(seq_len: int, head_dim: int, base: float = ROPE_BASE):
    """cos/sin tables [seq, head_dim] for rotary position embeddings (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, heads, seq, head_dim] by position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def init_std_scaled(std: float, num_layers: int) -> float:
    """GPT-2 scaling of the residual-writing projections: std / sqrt(2 * layers)."""
    return std / math.sqrt(2.0 * num_layers)
