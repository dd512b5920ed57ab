"""Learned-clip asymmetric fake quantization (DESIGN.md, "QAT of linear-layer inputs").

clip = (c_lo, c_hi), n = 2^bits - 1:
Forward:  s = n / (c_hi - c_lo),  z = (clamp(x, c_lo, c_hi) - c_lo) * s,
          x_hat = round(z) / s + c_lo   (round half to even).
Backward: the exact derivative of the straight-through surrogate
          x_hat = clamp(x, c_lo, c_hi) + r / s with r = round(z) - z held constant.

The math lives in Triton helpers that the fused kernels of this package share (:func:`load_clip`,
:func:`quantize`, and for the backward :func:`_quantize_grad_acc`), beside PyTorch twins of the
same fp32 operations (:func:`quantize_torch`, :func:`quantize_grad_torch`); kernels that fuse the
quantizer into its producer (``kernels.norm_quant``, ``kernels.mlp_act``) are built from them.
Clip gradients are summed per program, then by :func:`clip_grad_from_partials` in a fixed order:
deterministic, no atomics. Divisions are per program, not per element (IEEE division would cost
more than the memory traffic): round(z) / s is computed as round(z) * ((c_hi - c_lo) / n).

This module also holds the stand-alone kernels for inputs whose producer is not fused (the
attention output). They read any [..., C] layout whose rows are two strided dims of contiguous
channels (the attention output permuted to [s, b, h] is one), so that layout change costs no copy.
The forward is compiled without FMA contraction (as ``kernels.norm_quant``): contracted, z * s + M
rounds once instead of twice (x_hat one grid step off on 1e-4 of the H200's bf16 outputs,
docs/benchmarks.md) and round(z) * step + c_lo becomes one FMA; uncontracted it computes
quantize_torch's operations, which W4A4 evaluation relies on (it runs this kernel for every layer).

Inverted clips (c_hi <= c_lo) make the outputs NaN rather than raise: a check on the host would
synchronize every call, one on the device costs launches; the trainer reports the NaN step.
"""
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = (None, "triton", "torch")
MAX_BITS = 16  # keeps z below 2^22, where the magic-number rounding below is exact
# 1.5 * 2^23: in fp32, (z + M) - M rounds z in [0, 2^22) half to even (libdevice rint has no
# interpreter fallback, and this is exact on both).
_ROUND_MAGIC = tl.constexpr(12582912.0)
_TILE = 4096            # elements per program and tile
# Backward launch settings, measured on one H200 (bf16, CUDA-graph replay, the previous kernel
# beside it, settings as in bench/kernel_sweep.py; 2026-11-24): 4096 elements per program (one tile) on 8 warps: 0.0516 ms =
# 0.96 of a device copy at 16384 x 2048 contiguous (was 0.0643 ms = 0.77), 0.0523 ms = 0.95 on the
# attention-output layout (was 0.0656 = 0.76), 0.196-0.200 ms = 0.96 at 16384 x 8192 (was 0.93).
# 4 warps measured the same, 2048-element programs 1-2% slower, 8192-16384 5-10%; more tiles per
# program (prefetched, unrolled) 15-25% slower (registers), so TILES stays 1 (kept for the sweep).
# Of the 12.7 us gained at 2048: ~1.3 us from the second stage's PDL launch and early trigger.
_BWD_BLOCK = 4096
_BWD_TILES = 1
_BWD_WARPS = 8
# Second stage: one program, one pass per 8192 partials, 16 warps (1.8 us alone for 8192 partials).
_REDUCE_BLOCK = 8192
_REDUCE_WARPS = 16


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
def is_clipped(v, c_lo, c_hi):
    return (v < c_lo) | (v > c_hi)


@triton.jit
def _acc_scale(c_lo, c_hi, s):
    """The s that _quantize_grad_acc takes: load_clip's, but 0 for inverted clips (c_hi <= c_lo,
    where s is NaN), so that r stays finite there; still NaN for NaN clips."""
    return tl.where(c_hi <= c_lo, 0.0, s)


@triton.jit
def _quantize_grad_acc(v, g, c_lo, c_hi, s, acc_a, acc_b, acc_d):
    """The quantizer backward (quantize_grad_torch's math) for a tile, its clip shares added to three
    accumulators in few instructions per element: returns (dv, acc_a, acc_b, acc_d), dv bitwise
    quantize_grad_torch's,
    and dc_lo = sum(acc_b) - sum(acc_d) / n, dc_hi = sum(acc_a) + sum(acc_d) / n
    (:func:`_finish_clip_sums`). s: :func:`_acc_scale`.

    acc_a / acc_b get g beyond either clip (one select each); acc_d gets r * dv, r = round(z) - z,
    in one FFMA: r is finite wherever dv = 0, so that dv masks it, and the 1 / n is applied per
    program. The sums are quantize_grad_torch's up to fp32 rounding, NaN where they are NaN, except with
    inverted clips and NaN inputs at once (finite here; NaN outputs there anyway) and clips closer
    than n / FLT_MAX (s = inf)."""
    above = v >= c_hi
    below = v <= c_lo
    inside = ~(above | below)
    z = (tl.minimum(tl.maximum(v, c_lo), c_hi) - c_lo) * s
    dv = tl.where(inside, g, 0.0)
    acc_d += (((z + _ROUND_MAGIC) - _ROUND_MAGIC) - z) * dv
    acc_a += tl.where(above, g, 0.0)
    acc_b += tl.where(below, g, 0.0)
    return dv, acc_a, acc_b, acc_d


@triton.jit
def _neg_zeros(SHAPE: tl.constexpr):
    """fp32 -0.0 (bitcast: tl.full makes -0.0 a +0.0): -0.0 + x is x, so a first add folds away."""
    return tl.full(SHAPE, -2147483648, dtype=tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _finish_clip_sums(acc_a, acc_b, acc_d, inv_n, N: tl.constexpr):
    """(dc_lo, dc_hi) of a program from _quantize_grad_acc's N-element accumulators: one joint
    cross-warp reduction of the two sums (a fixed order)."""
    d = acc_d * inv_n
    to_lo = tl.reshape(acc_b - d, [N], can_reorder=True)
    to_hi = tl.reshape(acc_a + d, [N], can_reorder=True)
    return tl.reduce((to_lo, to_hi), 0, _add_pairs)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Second reduction stage over (2, n) partials: one program, fixed order, bitwise repeatable.
    PDL: launched as a programmatic dependent of the kernel that wrote the partials, it waits for
    that grid's completion here (its launch overlaps the first stage's tail)."""
    if PDL:
        gdc_wait()
    acc = tl.zeros([2, BLOCK], dtype=tl.float32)
    row = tl.arange(0, 2)[:, None] * n_partials
    start = 0
    while start < n_partials:  # not range(): the interpreter cannot iterate to a runtime bound
        idx = start + tl.arange(0, BLOCK)[None, :]
        acc += tl.load(partial_ptr + row + idx, mask=idx < n_partials, other=0.0)
        start += BLOCK
    tl.store(out_ptr + tl.arange(0, 2), tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


def _clip_grad_from_partials(partials, dtype, block=_REDUCE_BLOCK, num_warps=_REDUCE_WARPS, pdl=None):
    """clip_grad_from_partials with its launch settings. pdl (default: on CUDA): launched as a
    programmatic dependent launch of the kernel before it in the stream, which wrote the partials
    or waited for the kernel that did (every normally launched kernel has): gdc_wait waits for that
    grid's completion and its memory, and the launch overlaps that kernel's tail, worth ~1.3 us per
    backward on H200 with the first stage's early trigger."""
    out = torch.empty(2, dtype=dtype, device=partials.device)
    n = partials.shape[1]
    block = min(block, max(triton.next_power_of_2(n), 32 * num_warps))
    if partials.is_cuda if pdl is None else pdl:   # no inline asm (gdc_wait) in the interpreter
        _sum_partials_kernel[(1,)](partials, out, n, BLOCK=block, PDL=True, num_warps=num_warps, launch_pdl=True)
    else:
        _sum_partials_kernel[(1,)](partials, out, n, BLOCK=block, num_warps=num_warps)
    return out


def clip_grad_from_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(dc_lo, dc_hi) in `dtype` from fp32 partial sums laid out (2, n_programs)."""
    return _clip_grad_from_partials(partials, dtype)


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


def _block_shape(n_cols):
    """(BLOCK_R, BLOCK_C) of a program's tile of about _TILE elements, whole rows when they fit."""
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
def _ld(ptr, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _bwd_offsets(tile, cols, n, n_rows, n_cols, n_j, magic, shift, x_stride_i, x_stride_j, dx_stride_i,
                 dx_stride_j, LAYOUT: tl.constexpr, EVEN: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Offsets of x, g and dx, and the mask (unused when EVEN), of row tile `tile` ([BLOCK_R,
    BLOCK_C], columns `cols`). LAYOUT 0: x, g and dx contiguous, the tile is BLOCK_C consecutive
    elements (BLOCK_R = 1); 1: rows at r * stride_j; 2: rows r = (i, j) at i * stride_i + j * stride_j,
    i = r // n_j by a multiply-high (magic, shift: _divider): no division. Rows are int32 (the host
    checks), offsets int64."""
    if LAYOUT == 0:
        base = tile.to(tl.int64) * BLOCK_C
        off = base + cols[None, :]
        return off, off, off, cols[None, :] < (n - base)
    else:
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        if LAYOUT == 1:
            i = tl.zeros_like(rows)
            j = rows
        else:
            i = (tl.umulhi(rows.to(tl.uint32), magic.to(tl.uint32)) >> shift.to(tl.uint32)).to(tl.int32)
            j = rows - i * n_j
        i = i.to(tl.int64)
        j = j.to(tl.int64)
        x_off = (i * x_stride_i + j * x_stride_j)[:, None] + cols[None, :]
        dx_off = (i * dx_stride_i + j * dx_stride_j)[:, None] + cols[None, :]
        g_off = (rows.to(tl.int64) * n_cols)[:, None] + cols[None, :]
        return x_off, g_off, dx_off, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit(do_not_specialize=["magic", "shift"])
def _bwd_kernel(x_ptr, g_ptr, clip_ptr, dx_ptr, partial_ptr, n, n_rows, n_cols, n_j, magic, shift,
                x_stride_i, x_stride_j, dx_stride_i, dx_stride_j, n_steps, inv_n,
                LAYOUT: tl.constexpr, EVEN: tl.constexpr, TRIGGER: tl.constexpr, TILES: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx for TILES row tiles (n elements in all), and the program's partial sums of dc_lo, dc_hi at
    partial_ptr[0, pid] and [1, pid]: the shares are summed in registers, so there is one joint
    cross-warp reduction per program, not per tile. Each tile's loads are issued before the previous
    tile's math, the first before the clip is read (its latency, and the division behind s, overlap
    the loads)."""
    if TRIGGER:   # the second stage may launch (and wait in gdc_wait) once every program has started
        gdc_launch_dependents()
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = tl.program_id(0) * TILES
    x_off, g_off, dx_off, mask = _bwd_offsets(tile, cols, n, n_rows, n_cols, n_j, magic, shift, x_stride_i,
                                              x_stride_j, dx_stride_i, dx_stride_j, LAYOUT, EVEN, BLOCK_R, BLOCK_C)
    v_next = _ld(x_ptr + x_off, mask, EVEN)
    g_next = _ld(g_ptr + g_off, mask, EVEN)
    c_lo, c_hi, s, _ = load_clip(clip_ptr, n_steps)
    s = _acc_scale(c_lo, c_hi, s)
    acc_a = _neg_zeros([BLOCK_R, BLOCK_C])
    acc_b = _neg_zeros([BLOCK_R, BLOCK_C])
    acc_d = _neg_zeros([BLOCK_R, BLOCK_C])
    for t in tl.static_range(TILES):
        v = v_next.to(tl.float32)
        g = g_next.to(tl.float32)
        store_off, store_mask = dx_off, mask
        if t + 1 < TILES:
            x_off, g_off, dx_off, mask = _bwd_offsets(tile + t + 1, cols, n, n_rows, n_cols, n_j, magic, shift,
                                                      x_stride_i, x_stride_j, dx_stride_i, dx_stride_j, LAYOUT,
                                                      EVEN, BLOCK_R, BLOCK_C)
            v_next = _ld(x_ptr + x_off, mask, EVEN)
            g_next = _ld(g_ptr + g_off, mask, EVEN)
        dv, acc_a, acc_b, acc_d = _quantize_grad_acc(v, g, c_lo, c_hi, s, acc_a, acc_b, acc_d)
        if EVEN:
            tl.store(dx_ptr + store_off, dv.to(dx_ptr.dtype.element_ty))
        else:
            tl.store(dx_ptr + store_off, dv.to(dx_ptr.dtype.element_ty), mask=store_mask)
    lo, hi = _finish_clip_sums(acc_a, acc_b, acc_d, inv_n, BLOCK_R * BLOCK_C)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + pid, lo)
    tl.store(partial_ptr + tl.num_programs(0) * tl.num_programs(1) + pid, hi)


def _divider(d):
    """(magic, shift) with r // d == umulhi(r, magic) >> shift for 0 <= r < 2^31, 2 <= d < 2^31
    (Granlund & Montgomery's round-up method: magic = ceil(2^(31 + l) / d) < 2^32, l = ceil(log2 d))."""
    if not 2 <= d < 2 ** 31:
        raise ValueError(f"divisor {d} out of range")
    l = (d - 1).bit_length()
    return -(-(1 << (31 + l)) // d), l - 1


@functools.lru_cache(maxsize=None)
def _inv_steps(bits):
    """1 / (2^bits - 1) rounded once to fp32, as div_rn(1.0, n_steps) in the kernels."""
    return torch.tensor(1.0).div(float(2 ** bits - 1)).item()


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
    block_r, block_c = _block_shape(n_cols)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    counts = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=x.device) if clipped is not None else out
    _fwd_kernel[grid](x, clip, out, counts, n_rows, n_cols, n_j, stride_i, stride_j, float(2 ** bits - 1),
                      COUNT=clipped is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
                      enable_fp_fusion=False)
    if clipped is not None:
        add_clipped(clipped, counts)
    return out


def _backward_triton(x, g, clip, bits, tiles=_BWD_TILES, num_warps=_BWD_WARPS, block=_BWD_BLOCK, trigger=True):
    """Launch settings are arguments only so that bench/kernel_sweep.py can tune them. trigger (on
    CUDA): the programs let the second stage launch early (gdc_launch_dependents)."""
    x, (n_i, n_j, x_stride_i, x_stride_j) = _as_rows(x)
    g = g.contiguous()
    dx = torch.empty_like(x)   # x's strides when x is dense, as the producer's own gradient would be
    n_cols = x.shape[-1]
    dx_stride_i, dx_stride_j = ((x_stride_i, x_stride_j) if dx.stride() == x.stride()
                                else (n_j * n_cols, n_cols))
    n_rows = n_i * n_j
    n = n_rows * n_cols
    if n_rows + block * tiles >= 2 ** 31:   # row indices are int32
        raise ValueError(f"fake_quant: {n_rows} rows, more than the backward kernel indexes")
    if n_i == 1 and x.is_contiguous() and dx.is_contiguous():   # one flat range (g is contiguous)
        layout, block_r, block_c = 0, 1, block
        grid = (triton.cdiv(n, block * tiles), 1)
        even = n % (block * tiles) == 0
    else:
        layout = 1 if n_i == 1 else 2
        block_c = min(triton.next_power_of_2(n_cols), block)
        block_r = max(1, block // block_c)
        grid = (triton.cdiv(n_rows, block_r * tiles), triton.cdiv(n_cols, block_c))
        even = n_rows % (block_r * tiles) == 0 and n_cols % block_c == 0
    magic, shift = _divider(n_j) if layout == 2 else (0, 0)
    partials = torch.empty(2, grid[0] * grid[1], dtype=torch.float32, device=x.device)
    _bwd_kernel[grid](x, g, clip, dx, partials, n, n_rows, n_cols, n_j, magic, shift, x_stride_i, x_stride_j,
                      dx_stride_i, dx_stride_j, float(2 ** bits - 1), _inv_steps(bits), LAYOUT=layout,
                      EVEN=even, TRIGGER=trigger and x.is_cuda, TILES=tiles, BLOCK_R=block_r, BLOCK_C=block_c,
                      num_warps=num_warps)
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


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees instead of the autograd function (see the package docstring)
# ---------------------------------------------------------------------------------------------

def new_counter(x: torch.Tensor, count: bool) -> torch.Tensor:
    """The clipped-element counter a custom op fills and returns: an op returns tensors only, so
    without counting it returns an empty one (allocated, not written)."""
    return x.new_zeros((), dtype=torch.int64) if count else x.new_empty(0, dtype=torch.int64)


@torch.library.custom_op("qat_kernels::fake_quant", mutates_args=())
def fake_quant_op(x: torch.Tensor, clip: torch.Tensor, bits: int, impl: str,
                  count: bool) -> tuple[torch.Tensor, torch.Tensor]:
    clipped = new_counter(x, count)
    return _FORWARD[impl](x, clip, bits, clipped if count else None), clipped


@fake_quant_op.register_fake
def _(x, clip, bits, impl, count):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), new_counter(x, count)


def _grad_like(x):
    """An empty dx laid out as the Triton backward lays it out (x's layout when it reads x in place)."""
    return torch.empty_like(x if _row_layout(x) is not None else x.contiguous())


@torch.library.custom_op("qat_kernels::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(x: torch.Tensor, g: torch.Tensor, clip: torch.Tensor, bits: int,
                            impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dclip = _BACKWARD[impl](x, g, clip, bits)
    if impl == "torch":   # the layout the fake promises (the Triton path's by construction)
        dx = _grad_like(x).copy_(dx)
    return dx, dclip


@_fake_quant_backward_op.register_fake
def _(x, g, clip, bits, impl):
    return _grad_like(x), torch.empty_like(clip)


def _fake_quant_setup(ctx, inputs, output):
    x, clip, bits, impl, _ = inputs
    ctx.save_for_backward(x, clip)
    ctx.bits, ctx.impl = bits, impl


def _fake_quant_grad(ctx, g, _):
    x, clip = ctx.saved_tensors
    return *_fake_quant_backward_op(x, g, clip, ctx.bits, ctx.impl), None, None, None


fake_quant_op.register_autograd(_fake_quant_grad, setup_context=_fake_quant_setup)


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
    if torch.compiler.is_compiling():
        x_hat, count = fake_quant_op(x, clip, bits, resolve_impl(impl, x), clipped is not None)
        if clipped is not None:
            clipped += count
        return x_hat
    return _FakeQuant.apply(x, clip, bits, resolve_impl(impl, x), clipped)
