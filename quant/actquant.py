"""Activation quantizers for W8A8 / W4A4 evaluation: integer codes plus their dequantized values.

Two families: dynamic per-token min-max (grid fitted per row of the last dim at run time, the
same grid conventions as the weights in quant.rtn) and the static learned clip of the QAT
models ("native A4"), whose forward is the QAT formula operation for operation, so evaluation
sees exactly the activations training saw.
"""
from typing import NamedTuple

import torch

from quant.rtn import (check_bits, check_finite, dequantize_codes, minmax_params, quantize_codes,
                       require)


class TokenQuant(NamedTuple):
    """Per-token codes (float, integer-valued) with a scale and zero point per token [..., 1]."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero)


def quantize_per_token(x: torch.Tensor, bits: int, sym: bool = False) -> TokenQuant:
    """Dynamic min-max grid per token (over the last dim), in float32."""
    check_bits(bits)
    check_finite("activations", x)
    xf = x.float()
    scale, zero = minmax_params(xf, bits, sym)
    return TokenQuant(quantize_codes(xf, scale, zero, bits), scale, zero)


def fake_quant_per_token(x: torch.Tensor, bits: int, sym: bool = False) -> torch.Tensor:
    """x quantized per token and dequantized, in x's dtype (W4A4: bits=4, asymmetric)."""
    return quantize_per_token(x, bits, sym).dequantize().to(x.dtype)


class ClipQuant(NamedTuple):
    """Codes round(z) in [0, 2^bits - 1] of the learned clip, with s = n / (c_hi - c_lo)."""
    codes: torch.Tensor
    s: torch.Tensor
    c_lo: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.codes / self.s + self.c_lo  # DESIGN.md: x_hat = round(z) / s + c_lo


def quantize_static_clip(x: torch.Tensor, c_lo, c_hi, bits: int) -> ClipQuant:
    """The QAT grid of a layer input: z = (clamp(x, c_lo, c_hi) - c_lo) * s, in float32."""
    check_bits(bits)
    check_finite("activations", x)
    c_lo, c_hi = (torch.as_tensor(c, dtype=torch.float32, device=x.device) for c in (c_lo, c_hi))
    require(c_lo < c_hi, "static clip needs c_lo < c_hi")
    s = c_lo.new_tensor(2 ** bits - 1) / (c_hi - c_lo)
    return ClipQuant(torch.round((torch.clamp(x.float(), c_lo, c_hi) - c_lo) * s), s, c_lo)


def fake_quant_static_clip(x: torch.Tensor, c_lo, c_hi, bits: int) -> torch.Tensor:
    """Native-A4 activations: x quantized on its learned clip and dequantized, in x's dtype."""
    return quantize_static_clip(x, c_lo, c_hi, bits).dequantize().to(x.dtype)
