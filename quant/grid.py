"""Min-max round-to-nearest (RTN) weight quantization and the shared quantized-weight container.

Grid conventions (used by GPTQ, AdaDim, the activation quantizers and the checkpoint format):
codes are unsigned integers in [0, 2^bits - 1] and dequantize as (code - zero) * scale.

- asymmetric: the range [min(x, 0), max(x, 0)] is split into 2^bits - 1 steps; including 0 keeps
  the zero point an integer inside the code range, so 0 is exact.
- symmetric: scale = max|x| / (2^(bits-1) - 1), zero = 2^(bits-1); codes 1 .. 2^bits - 1 are used,
  i.e. the signed values -(2^(bits-1) - 1) .. 2^(bits-1) - 1 (int8: -127 .. 127).

Rounding is half to even (torch.round). A group with no range (all zeros) gets scale 1, so its
codes are the zero point and nothing divides by zero.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

MIN_BITS, MAX_BITS = 2, 8
DIMS = ("oc", "ic")


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def require(ok: torch.Tensor, msg: str) -> None:
    """Raise ValueError(msg) unless the bool tensor ``ok`` holds; on CUDA a device-side assert,
    so per-layer checks in evaluation never synchronize."""
    if ok.is_cuda:
        torch._assert_async(ok, msg)
    elif not ok:
        raise ValueError(msg)


def check_finite(name: str, t: torch.Tensor) -> None:
    require(torch.isfinite(t).all(), f"{name} contains NaN or inf")


def group_count(length: int, group_size: int) -> int:
    """Number of groups along a row of ``length``; -1 means one group for the whole row."""
    if group_size == -1:
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be -1 or a positive int, got {group_size!r}")
    if length % group_size:
        raise ValueError(f"group_size {group_size} does not divide the row length {length}")
    return length // group_size


def minmax_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``x`` (reduced over the last dim, kept as size 1)."""
    maxq = 2 ** bits - 1
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        half = 2 ** (bits - 1)
        scale = torch.maximum(-lo, hi) / (half - 1)
    else:
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero range (or underflow)
    if sym:
        zero = torch.full_like(scale, half)
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(x, scale, zero, bits: int, out=None) -> torch.Tensor:
    """Integer-valued codes (in x's float dtype) of x on the grid (scale, zero), written to ``out``
    if given (GPTQ's column of the block's codes)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1, out=out)


def dequantize_codes(codes, scale, zero) -> torch.Tensor:
    return (codes - zero) * scale


@dataclass
class QuantizedWeight:
    """Integer codes of a [out, in] weight plus their grid.

    ``dim`` is the quantization orientation: "oc" (per output channel) stores codes as W, groups
    running along the input dim; "ic" (AdaDim per input channel) stores codes as W^T, groups
    running along the output dim. ``g_idx[j]`` is the group of stored column j (it is not
    j // group_size after GPTQ with act-order and dynamic groups).
    """
    codes: torch.Tensor   # uint8 [rows, cols] in the stored orientation
    scales: torch.Tensor  # float [rows, n_groups] (float32; float64 when computed in float64)
    zeros: torch.Tensor   # uint8 [rows, n_groups]
    g_idx: torch.Tensor   # int64 [cols]
    bits: int
    group_size: int
    sym: bool
    dim: str = "oc"
    TENSORS: ClassVar[tuple[str, ...]] = ("codes", "scales", "zeros", "g_idx")  # the tensor fields, in order

    @property
    def shape(self) -> tuple[int, int]:
        """Shape [out, in] of the original weight."""
        rows, cols = self.codes.shape
        return (rows, cols) if self.dim == "oc" else (cols, rows)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The [out, in] weight the codes stand for."""
        w = dequantize_codes(self.codes.to(dtype), self.scales.to(dtype)[:, self.g_idx],
                             self.zeros.to(dtype)[:, self.g_idx])
        return w if self.dim == "oc" else w.T

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scales.to(device),
                               self.zeros.to(device), self.g_idx.to(device), self.bits,
                               self.group_size, self.sym, self.dim)


def natural_g_idx(cols: int, group_size: int, device=None) -> torch.Tensor:
    return torch.arange(cols, device=device) // (cols if group_size == -1 else group_size)


def pack_result(codes, scales, zeros, g_idx, bits, group_size, sym, dim) -> QuantizedWeight:
    """Build a QuantizedWeight from float-valued codes/params in the stored orientation."""
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx,
                           bits, group_size, sym, dim)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = -1, sym: bool = False,
                 dim: str = "oc") -> QuantizedWeight:
    """Min-max RTN of a [out, in] weight, per channel (group_size -1) or per group.

    dim "oc" groups along the input dim of each output row; "ic" groups along the output dim of
    each input column (AdaDim per-IC).
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if dim not in DIMS:
        raise ValueError(f"dim must be one of {DIMS}, got {dim!r}")
    check_finite("weight", weight)
    w = weight.float() if dim == "oc" else weight.float().T
    rows, cols = w.shape
    n_groups = group_count(cols, group_size)
    grouped = w.reshape(rows, n_groups, cols // n_groups)
    scale, zero = minmax_params(grouped, bits, sym)
    codes = quantize_codes(grouped, scale, zero, bits).reshape(rows, cols)
    return pack_result(codes, scale.squeeze(-1), zero.squeeze(-1),
                       natural_g_idx(cols, group_size, w.device), bits, group_size, sym, dim)
