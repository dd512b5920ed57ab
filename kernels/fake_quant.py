"""Learned-clip asymmetric fake quantization (DESIGN.md, "QAT of linear-layer inputs").

clip = (c_lo, c_hi), n = 2^bits - 1:
Forward:  s = n / (c_hi - c_lo),  z = (clamp(x, c_lo, c_hi) - c_lo) * s,
          x_hat = round(z) / s + c_lo   (round half to even).
Backward: the exact derivative of the straight-through surrogate
          x_hat = clamp(x, c_lo, c_hi) + r / s with r = round(z) - z held constant.

The math lives in three Triton helpers that every fused kernel of this package shares
(:func:`load_clip`, :func:`quantize`, :func:`quantize_grad`), beside PyTorch twins of the same
fp32 operations (:func:`quantize_torch`, :func:`quantize_grad_torch`); kernels that fuse the
quantizer into its producer (``kernels.norm_quant``, ``kernels.act_quant``) are built from them.
Clip gradients are summed per program, then by :func:`clip_grad_from_partials` in a fixed order:
deterministic, no atomics. Divisions are per program, not per element (IEEE division would cost
more than the memory traffic): round(z) / s is computed as round(z) * ((c_hi - c_lo) / n).

This module also holds the stand-alone kernels for inputs whose producer is not fused (the
attention output). They read any [..., C] layout whose rows are two strided dims of contiguous
channels (the attention output permuted to [s, b, h] is one), so that layout change costs no copy.

Inverted clips (c_hi <= c_lo) make the outputs NaN rather than raise: a check on the host would
synchronize every call, one on the device costs launches; the trainer reports the NaN step.
"""
import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = (None, "triton", "torch")
MAX_BITS = 16  # keeps z below 2^22, where the magic-number rounding below is exact
# 1.5 * 2^23: in fp32, (z + M) - M rounds z in [0, 2^22) half to even (libdevice rint has no
# interpreter fallback, and this is exact on both).
_ROUND_MAGIC = tl.constexpr(12582912.0)
_TILE = 4096            # elements per program and tile
# Backward: row tiles per program (their clip shares are summed in registers before one reduction)
# and warps: 1 and 8 measured best on H200 (bench/kernels_sweep.py: 0.82 / 0.93 of a device copy at
# 16384 x 2048 / 8192, where more tiles per program gained nothing).
_BWD_TILES = 1
_BWD_WARPS = 8
_REDUCE_BLOCK = 8192    # second stage: one pass per 8192 partials


def resolve_impl(impl, x: torch.Tensor) -> str:
    """Pick the implementation for every kernel in this package: Triton on CUDA, torch elsewhere.

    "triton" can be forced on CPU tensors, which only works under TRITON_INTERPRET=1 (tests).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl is None:
        return "triton" if x.is_cuda else "torch"
    return impl


def check_quant_args(name: str, x, clip, bits) -> None:
    """Argument checks shared by every fake-quantizing entry point; `name` prefixes the message."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: input must be a bf16/fp16/fp32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError(f"{name}: input needs a channel (last) dim, got a 0-dim tensor")
    if (not isinstance(clip, torch.Tensor) or clip.dtype not in _FLOAT_DTYPES
            or tuple(clip.shape) != (2,) or clip.stride(0) != 1):
        raise TypeError(f"{name}: clip must be a float tensor of shape (2,) and stride 1 holding (c_lo, c_hi), got "
                        f"{getattr(clip, 'dtype', type(clip))} of shape {tuple(getattr(clip, 'shape', ()))}")
    if clip.device != x.device:
        raise ValueError(f"{name}: clip is on {clip.device} but the input is on {x.device}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{name}: bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def check_clipped(clipped, x) -> None:
    if clipped is not None and (clipped.dtype != torch.int64 or clipped.dim() != 0 or clipped.device != x.device):
        raise TypeError("clipped must be a 0-dim int64 tensor on the input's device")


# ---------------------------------------------------------------------------------------------
# The math, in PyTorch (fp32 in, fp32 out)
# ---------------------------------------------------------------------------------------------

def _clip_params_torch(clip, bits):
    clip = clip.detach().float()
    c_lo, c_hi = clip[0], clip[1]
    width, n = c_hi - c_lo, clip.new_tensor(2 ** bits - 1)
    s = torch.where(width > 0, n / width, float("nan"))  # inverted clips: NaN, as in the kernels
    return c_lo, c_hi, s, width / n


def quantize_torch(v, clip, bits):
    """x_hat of fp32 v."""
    c_lo, c_hi, s, step = _clip_params_torch(clip, bits)
    z = (torch.clamp(v, c_lo, c_hi) - c_lo) * s
    return torch.round(z) * step + c_lo


def quantize_grad_torch(v, g, clip, bits):
    """(dv, dclip) for fp32 v and upstream gradient g: dv fp32, dclip fp32 of shape (2,)."""
    c_lo, c_hi, s, _ = _clip_params_torch(clip, bits)
    above, below = v >= c_hi, v <= c_lo
    inside = ~(above | below)
    z = (torch.clamp(v, c_lo, c_hi) - c_lo) * s
    delta_g = torch.where(inside, (torch.round(z) - z) * (1.0 / (2 ** bits - 1)) * g, 0.0)
    dc_lo = torch.where(below, g, 0.0).sum() - delta_g.sum()
    dc_hi = torch.where(above, g, 0.0).sum() + delta_g.sum()
    return torch.where(inside, g, 0.0), torch.stack([dc_lo, dc_hi])


def clipped_torch(v, clip):
    """Number of elements of v outside [c_lo, c_hi]."""
    c_lo, c_hi = clip.detach().float().unbind()
    return ((v < c_lo) | (v > c_hi)).sum()


# ---------------------------------------------------------------------------------------------
# The math, in Triton (fp32 in, fp32 out)
# ---------------------------------------------------------------------------------------------

@triton.jit
def load_clip(clip_ptr, n_steps):
    """c_lo, c_hi (in fp32), s and the grid step 1/s; s is NaN for inverted clips."""
    c_lo = tl.load(clip_ptr).to(tl.float32)
    c_hi = tl.load(clip_ptr + 1).to(tl.float32)
    width = c_hi - c_lo
    s = tl.where(width > 0, tl.math.div_rn(n_steps, width), float("nan"))  # IEEE, as torch
    step = tl.math.div_rn(width, n_steps)
    return c_lo, c_hi, s, step


@triton.jit
def quantize(v, c_lo, c_hi, s, step):
    z = (tl.minimum(tl.maximum(v, c_lo), c_hi) - c_lo) * s
    return ((z + _ROUND_MAGIC) - _ROUND_MAGIC) * step + c_lo


@triton.jit
def quantize_grad(v, g, c_lo, c_hi, s, inv_n):
    """(dv, to_lo, to_hi): the input gradient and each element's share of dc_lo and dc_hi, to be
    summed. Masked-off lanes must carry g = 0 (their shares are then 0)."""
    above = v >= c_hi
    below = v <= c_lo
    inside = ~(above | below)
    z = (tl.minimum(tl.maximum(v, c_lo), c_hi) - c_lo) * s
    delta_g = tl.where(inside, (((z + _ROUND_MAGIC) - _ROUND_MAGIC) - z) * inv_n * g, 0.0)
    return tl.where(inside, g, 0.0), tl.where(below, g, -delta_g), tl.where(above, g, delta_g)


@triton.jit
def is_clipped(v, c_lo, c_hi):
    return (v < c_lo) | (v > c_hi)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, BLOCK: tl.constexpr):
    """Second reduction stage over (2, n) partials: one program, fixed order, bitwise repeatable."""
    acc_lo = tl.zeros([BLOCK], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < n_partials:  # not range(): the interpreter cannot iterate to a runtime bound
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_partials
        acc_lo += tl.load(partial_ptr + idx, mask=mask, other=0.0)
        acc_hi += tl.load(partial_ptr + n_partials + idx, mask=mask, other=0.0)
        start += BLOCK
    tl.store(out_ptr, tl.sum(acc_lo, axis=0).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + 1, tl.sum(acc_hi, axis=0).to(out_ptr.dtype.element_ty))


def clip_grad_from_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(dc_lo, dc_hi) in `dtype` from fp32 partial sums laid out (2, n_programs)."""
    out = torch.empty(2, dtype=dtype, device=partials.device)
    _sum_partials_kernel[(1,)](partials, out, partials.shape[1], BLOCK=_REDUCE_BLOCK, num_warps=16)
    return out


def add_clipped(clipped, counts: torch.Tensor) -> None:
    """Add per-program int32 counts of clipped elements to the int64 counter `clipped`."""
    clipped += counts.sum(dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Stand-alone kernels: rows of C contiguous channels, row r = (i, j) at i * stride_i + j * stride_j
# ---------------------------------------------------------------------------------------------

def _row_layout(x):
    """(n_i, n_j, stride_i, stride_j) when x's leading dims merge into two strided row dims over a
    contiguous last dim, else None."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return None
    dims = []
    for n, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if n == 1:
            continue
        if dims and dims[-1][1] == n * stride:
            dims[-1] = (dims[-1][0] * n, stride)
        else:
            dims.append((n, stride))
    if len(dims) > 2:
        return None
    dims = [(1, 0)] * (2 - len(dims)) + dims
    return dims[0][0], dims[1][0], dims[0][1], dims[1][1]


def _tile(n_cols):
    block_c = min(triton.next_power_of_2(n_cols), _TILE)
    return max(1, _TILE // block_c), block_c


@triton.jit
def _row_offsets(rows, n_j, stride_i, stride_j):
    return (rows // n_j) * stride_i + (rows % n_j) * stride_j


@triton.jit
def _fwd_kernel(x_ptr, clip_ptr, out_ptr, count_ptr, n_rows, n_cols, n_j, stride_i, stride_j,
                n_steps, COUNT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c_lo, c_hi, s, step = load_clip(clip_ptr, n_steps)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    src = _row_offsets(rows, n_j, stride_i, stride_j)[:, None] + cols[None, :]
    v = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x_hat = quantize(v, c_lo, c_hi, s, step)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], x_hat.to(out_ptr.dtype.element_ty), mask=mask)
    if COUNT:
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(count_ptr + pid, tl.sum(tl.sum((is_clipped(v, c_lo, c_hi) & mask).to(tl.int32), axis=1), axis=0))


@triton.jit
def _bwd_kernel(x_ptr, g_ptr, clip_ptr, dx_ptr, partial_ptr, n_rows, n_cols, n_j,
                x_stride_i, x_stride_j, dx_stride_i, dx_stride_j, n_steps,
                TILES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx for TILES row tiles, and the program's partial sums of dc_lo, dc_hi at partial_ptr[0, pid]
    and [1, pid]: the shares are summed in registers, so there is one cross-warp reduction per
    program and sum, not per tile."""
    c_lo, c_hi, s, _ = load_clip(clip_ptr, n_steps)
    inv_n = tl.math.div_rn(1.0, n_steps)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc_lo = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for t in range(TILES):
        rows = (tl.program_id(0).to(tl.int64) * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        v = tl.load(x_ptr + _row_offsets(rows, n_j, x_stride_i, x_stride_j)[:, None] + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dv, to_lo, to_hi = quantize_grad(v, g, c_lo, c_hi, s, inv_n)
        tl.store(dx_ptr + _row_offsets(rows, n_j, dx_stride_i, dx_stride_j)[:, None] + cols[None, :],
                 dv.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_lo += to_lo
        acc_hi += to_hi
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc_lo, axis=1), axis=0))
    tl.store(partial_ptr + tl.num_programs(0) * tl.num_programs(1) + pid, tl.sum(tl.sum(acc_hi, axis=1), axis=0))


def _as_rows(x):
    layout = _row_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = _row_layout(x)
    return x, layout


def _forward_triton(x, clip, bits, clipped=None):
    x, (n_i, n_j, stride_i, stride_j) = _as_rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_cols = x.shape[-1]
    n_rows = n_i * n_j
    block_r, block_c = _tile(n_cols)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    counts = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=x.device) if clipped is not None else out
    _fwd_kernel[grid](x, clip, out, counts, n_rows, n_cols, n_j, stride_i, stride_j, float(2 ** bits - 1),
                      COUNT=clipped is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    if clipped is not None:
        add_clipped(clipped, counts)
    return out


def _backward_triton(x, g, clip, bits, tiles=_BWD_TILES, num_warps=_BWD_WARPS):
    """Launch settings are arguments only so that bench/kernels_sweep.py can tune them."""
    x, (n_i, n_j, x_stride_i, x_stride_j) = _as_rows(x)
    g = g.contiguous()
    dx = torch.empty_like(x)   # x's strides when x is dense, as the producer's own gradient would be
    n_cols = x.shape[-1]
    dx_stride_i, dx_stride_j = ((x_stride_i, x_stride_j) if dx.stride() == x.stride()
                                else (n_j * n_cols, n_cols))
    n_rows = n_i * n_j
    block_r, block_c = _tile(n_cols)
    grid = (triton.cdiv(n_rows, block_r * tiles), triton.cdiv(n_cols, block_c))
    partials = torch.empty(2, grid[0] * grid[1], dtype=torch.float32, device=x.device)
    _bwd_kernel[grid](x, g, clip, dx, partials, n_rows, n_cols, n_j, x_stride_i, x_stride_j,
                      dx_stride_i, dx_stride_j, float(2 ** bits - 1), TILES=tiles, BLOCK_R=block_r,
                      BLOCK_C=block_c, num_warps=num_warps)
    return dx, clip_grad_from_partials(partials, clip.dtype)


def _forward_torch(x, clip, bits, clipped=None):
    v = x.contiguous().float()
    if clipped is not None:
        clipped += clipped_torch(v, clip)
    return quantize_torch(v, clip, bits).to(x.dtype)


def _backward_torch(x, g, clip, bits):
    dv, dclip = quantize_grad_torch(x.float(), g.float(), clip, bits)
    return dv.to(x.dtype), dclip.to(clip.dtype)


_FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def fake_quant_forward(x, clip, bits, impl=None, clipped=None):
    """x_hat without autograd (contiguous, x's dtype)."""
    check_quant_args("fake_quant", x, clip, bits)
    check_clipped(clipped, x)
    return _FORWARD[resolve_impl(impl, x)](x.detach(), clip.detach(), bits, clipped)


def fake_quant_backward(x, g, clip, bits, impl=None):
    """(dx, dclip) for upstream gradient g, from x alone; dx in x's dtype, dclip in clip's."""
    check_quant_args("fake_quant", x, clip, bits)
    if g.shape != x.shape:
        raise ValueError(f"fake_quant: gradient shape {tuple(g.shape)} != input shape {tuple(x.shape)}")
    return _BACKWARD[resolve_impl(impl, x)](x.detach(), g, clip.detach(), bits)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip, bits, impl, clipped):
        ctx.save_for_backward(x, clip)
        ctx.bits, ctx.impl = bits, impl
        return _FORWARD[impl](x, clip, bits, clipped)

    @staticmethod
    def backward(ctx, g):
        x, clip = ctx.saved_tensors
        dx, dclip = _BACKWARD[ctx.impl](x, g, clip, ctx.bits)
        return dx, dclip, None, None, None


def fake_quant(x, clip, bits, impl=None, clipped=None):
    """Fake-quantize x to `bits` bits on the learned clip range clip = (c_lo, c_hi) (differentiable
    in x and clip).

    x: [..., C] in bf16/fp16/fp32, any layout whose leading dims are two strided row dims (else it
    is copied); clip: float tensor of shape (2,). Returns x_hat contiguous in x's dtype; dx comes
    back in x's layout. clipped: optional 0-dim int64 counter that gets the number of inputs
    outside the clips added. impl: None (Triton on CUDA, torch otherwise), "triton" or "torch".
    """
    check_quant_args("fake_quant", x, clip, bits)
    check_clipped(clipped, x)
    return _FakeQuant.apply(x, clip, bits, resolve_impl(impl, x), clipped)
