"""W8A8 vector-wise: int8 activations per token x int8 weights per output channel, INT8 GEMM.

y[t, o] = s_x[t] * s_w[o] * sum_k q_x[t, k] q_w[o, k], the integer sum exact (int32), the
rescale in fp32. On CUDA the sum runs on the INT8 tensor cores through torch._int_mm; on CPU it
is computed exactly in int64. The same exact GEMM serves the W4A4 check: centred 4-bit codes
(code - zero, in [-15, 15]) fit in int8.
"""
import torch
import torch.nn.functional as F

from quant.activations import quantize_per_token
from quant.grid import require

# torch._int_mm on CUDA: A [M, K] with M > 16, K a positive multiple of 8; B [K, N] with N a
# positive multiple of 8 (aten/src/ATen/native/cuda/Blas.cpp). Smaller shapes are zero-padded.
_INT_MM_MIN_M, _INT_MM_MULTIPLE = 17, 8
# Largest K for which a sum of K products of int8 values (|v| <= 128) cannot overflow int32.
MAX_K = (2 ** 31 - 1) // (128 * 128)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes in [-127, 127] per row (last dim) and the fp32 scale [..., 1]."""
    q = quantize_per_token(x, bits=8, sym=True)
    return (q.codes - q.zero).to(torch.int8), q.scale


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def int_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a @ b^T of int8 a [M, K] and int8 b [N, K], as int32 [M, N]."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise TypeError("int_gemm takes two 2-D int8 tensors")
    (m, k), (n, k_b) = a.shape, b.shape
    if k != k_b:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}^T")
    if k > MAX_K:
        raise ValueError(f"K={k} can overflow the int32 accumulator (max {MAX_K})")
    if not a.is_cuda:
        return (a.long() @ b.long().T).int()
    mp = max(m, _INT_MM_MIN_M)
    kp, np_ = (_round_up(d, _INT_MM_MULTIPLE) for d in (k, n))
    out = torch._int_mm(_pad_to(a, mp, kp), _pad_to(b, np_, kp).T)  # B column-major [K, N]
    return out[:m, :n]


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 codes [out, in] and fp32 scales [out] of a linear weight."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    q, scale = quantize_int8(weight)
    return q, scale.squeeze(1)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor = None) -> torch.Tensor:
    """y = x W^T (+ bias) with x quantized per token to int8 on the fly; output in x's dtype."""
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {w_q.shape[1]}")
    require(w_scale.isfinite().all(), "weight scales contain NaN or inf")
    x_q, x_scale = quantize_int8(x.reshape(-1, x.shape[-1]))
    y = int_gemm(x_q, w_q).float() * x_scale * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
