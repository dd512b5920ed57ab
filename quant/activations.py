"""Activation quantizers for W8A8 / W4A4 evaluation.

Two families: dynamic per-token min-max (integer codes plus their dequantized values, the grid
fitted per row of the last dim at run time with the same conventions as the weights in quant.grid)
and the static learned clip of the QAT models ("native A4"), which is the training quantizer
itself (kernels.fake_quant_forward): evaluation quantizes bit for bit as training does.
"""
from typing import NamedTuple

import torch

import kernels
from quant.grid import (check_bits, check_finite, dequantize_codes, minmax_params, quantize_codes,
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


def fake_quant_static_clip(x: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Native-A4 activations: x on its learned clip = (c_lo, c_hi), in x's dtype, by the training
    quantizer (a second transcription of its formula rounds differently in fp32). Unlike training,
    refuses non-finite inputs and inverted clips instead of returning NaN."""
    check_finite("activations", x)
    require(clip[0] < clip[1], "static clip needs c_lo < c_hi")
    return kernels.fake_quant_forward(x, clip, bits)
