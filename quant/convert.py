"""Turn a TP=1 GPT into its WxAy evaluation model, without touching model/.

Every block linear (qkv, proj, fc1, fc2) gets an evaluation-time object in its ``input_quant``
slot with the same ``run(linear, x)`` interface as the QAT quantizer, and its weight replaced by
the dequantized weight of its integer codes. Embeddings and the LM head stay 16-bit.

- weights: codes from a quantized checkpoint (quant.quantize) when it has this bit width, else
  min-max RTN per output channel (asymmetric; 8 bits: symmetric int8 vector-wise, quant.int8).
- activations of a QAT model, at any width below 16: its learned static clip range on that width's
  grid, by the training quantizer itself (at the QAT width "native A4": an fp32 model on CPU gets
  bit for bit the layer inputs of training; not so in bf16, where training's fused norm and
  activation kernels quantize their unrounded fp32 result and evaluation the producer's bf16
  output; at 8 bits a finer grid over the same range: a QAT model trained on clamped inputs falls
  apart on unclamped ones, see docs/studies/w4a4-125m).
- other models' activations: 8 bits per-token symmetric int8 (with 8-bit weights and no checkpoint
  codes the layer runs the W8A8 vector-wise INT8 GEMM, quant.int8: torch._int_mm on GPU, exact
  integers on CPU); 4 bits and below per-token dynamic asymmetric min-max.

Dequantized codes times dequantized weights is the exact simulation of the integer GEMM up to
float rounding (Hopper has no INT4 MMA).
"""
import functools
from typing import Callable, Optional

import torch

from quant.activations import fake_quant_per_token, fake_quant_static_clip
from quant.int8 import quantize_weight_int8, w8a8_linear
from quant.grid import QuantizedWeight, rtn_quantize

# Name suffixes of a block's linears, in forward (GPTQ true-sequential) order.
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
BITS = (16, 8, 4, 3, 2)
# What a QAT model's A16 configurations are, in every table and file that shows them.
QUANTIZERS_OFF = "quantizers off, not a deployment configuration"


class ActQuant(torch.nn.Module):
    """``linear(quantize(x))``: activations fake-quantized on an integer grid, weight as loaded.
    (Modules, not plain objects, because the slot may hold the QAT quantizer module.)"""
    fuse_into_producer = False       # quantizes in run(), after the producer's plain output

    def __init__(self, quantize: Callable[[torch.Tensor], torch.Tensor], kind: str):
        super().__init__()
        self.quantize, self.kind = quantize, kind

    def run(self, linear, x):
        return linear(self.quantize(x.contiguous()))   # x may be a strided view (attention output)


class Int8Linear(torch.nn.Module):
    """W8A8 vector-wise: int8 weight codes per output channel, per-token int8 activations."""
    kind = "int8 GEMM"
    fuse_into_producer = False

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w_q, w_scale = quantize_weight_int8(weight)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)

    def run(self, linear, x):
        # Linear.forward adds the returned bias (column layers would add it inside megatron).
        return w8a8_linear(x.contiguous(), self.w_q, self.w_scale), linear.bias


def block_linears(model) -> list[tuple[str, torch.nn.Module]]:
    from model.gpt import linears
    return [(n, m) for n, m in linears(model) if n.endswith(BLOCK_LINEARS)]


def act_quantizer(bits: int, clip: Optional[torch.Tensor]) -> Optional[ActQuant]:
    """The evaluation-time activation quantizer of one linear input (None at 16 bits)."""
    if bits == 16:
        return None
    if clip is not None:
        return ActQuant(functools.partial(fake_quant_static_clip, clip=clip, bits=bits), "qat clip")
    if bits == 8:
        return ActQuant(functools.partial(fake_quant_per_token, bits=8, sym=True), "per-token int8")
    return ActQuant(functools.partial(fake_quant_per_token, bits=bits), f"per-token asym {bits}-bit")


@torch.no_grad()
def convert(model, weights: int, acts: int, quantized: Optional[dict[str, QuantizedWeight]] = None) -> dict[str, str]:
    """Make ``model`` (TP=1, QAT quantizers as loaded) compute with ``weights``-bit weights and
    ``acts``-bit activations, in place. ``quantized``: codes by linear name (from quant.quantize).
    Returns {"weights": source, "acts": quantizer kind} describing what was done (a QAT model's
    16-bit activations: QUANTIZERS_OFF)."""
    for bits, what in ((weights, "weights"), (acts, "acts")):
        if bits not in BITS:
            raise ValueError(f"{what} bits must be one of {BITS}, got {bits}")
    quantized = quantized or {}
    weight_src, act_kinds = set(), set()
    for name, linear in block_linears(model):
        qat = linear.input_quant
        clip = qat.clip.detach().float() if qat is not None and acts < 16 else None
        weight = linear.weight
        linear.input_quant = act_quantizer(acts, clip)
        q = quantized.get(name)
        if q is not None and q.shape != tuple(weight.shape):
            raise ValueError(f"{name}: quantized shape {q.shape} does not match the weight {tuple(weight.shape)}")
        if weights == 16:
            src = "16-bit"
        elif q is not None and q.bits == weights:
            weight.copy_(q.dequantize(weight.dtype))
            src = f"checkpoint codes ({q.bits}-bit)"
        elif weights == 8 and acts == 8 and clip is None:
            linear.input_quant = Int8Linear(weight)
            src = "int8 vector-wise"
        elif weights == 8:
            w_q, scale = quantize_weight_int8(weight)
            weight.copy_(w_q.to(weight.dtype) * scale[:, None])
            src = "int8 vector-wise"
        else:
            weight.copy_(rtn_quantize(weight, weights).dequantize(weight.dtype))
            src = f"rtn {weights}-bit per channel"
        weight_src.add(src)
        act_kinds.add(linear.input_quant.kind if linear.input_quant is not None
                      else QUANTIZERS_OFF if qat is not None else "16-bit")
    return {"weights": ", ".join(sorted(weight_src)), "acts": ", ".join(sorted(act_kinds))}
