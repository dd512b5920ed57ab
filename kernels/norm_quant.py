"""LayerNorm / RMSNorm fused with the fake quantizer of the next linear's input (qkv, fc1).

Unfused, QAT costs a norm output y written and read again, x_hat written, and in backward x_hat
recomputed and a separate quantizer backward: seven extra passes over an activation-sized tensor.
Fused, the forward reads x and writes only x_hat (which the linear keeps for its weight gradient);
the backward reads x and dL/dx_hat, recomputes y bit for bit as the forward did, and does the
quantizer backward (kernels.fake_quant.quantize_grad_torch's math) and the norm backward in the same pass.

Per row of N channels, all in fp32:
    layernorm: mean = mean(x), rstd = 1 / sqrt(mean((x - mean)^2) + eps), xnorm = (x - mean) * rstd
    rmsnorm:   rstd = 1 / sqrt(mean(x^2) + eps),                          xnorm = x * rstd
    y = xnorm * w (+ b),   x_hat = quantize(y)     (y is never stored, nor rounded to x's dtype)
Backward, with dy the straight-through gradient of y and dxhat = dy * w:
    dx = rstd * (dxhat - mean(dxhat) - xnorm * mean(dxhat * xnorm))   (rmsnorm: no mean(dxhat))
    dw = sum_rows dy * xnorm,   db = sum_rows dy,   dclip = sum of the quantizer's clip shares.
The forward keeps x, the parameters and per-row fp32 mean (layernorm) and rstd: nothing else of x's
size. Column sums are per-program fp32 partials summed in a fixed order afterwards: deterministic,
no atomics. Kernels are compiled without FMA contraction, so y and z round exactly as the PyTorch
reference rounds them and the forward and backward agree on every element's clip decision; the
backward's FMAs (dw, dx) are explicit, off that path.
"""
import functools

import torch
import triton
import triton.language as tl

from .fake_quant import (_ROUND_MAGIC, add_clipped, check_clipped, check_quant_args, clipped_torch,
                         is_clipped, load_clip, new_counter, quantize, quantize_grad_torch, quantize_torch,
                         resolve_impl)

KINDS = ("layernorm", "rmsnorm")
MAX_N = 16384  # whole rows live in registers (measured up to 8192; wider ones spill)

# Launch settings, measured on one H200 (GPU time by CUDA-graph replay, bf16, 16384 rows; one-off
# sweeps of 2026-11-23/24, the results in docs/benchmarks.md). Forward: tiles of
# 4096 elements, 32 per thread (2048: 2 rows on 4 warps). Backward: one row per step for rows of
# 1024 and more, 16 elements per thread (2048: 4 warps, 4096: 8), the next row prefetched, and as
# many programs as are resident at once: the kernel takes up to 128 registers per thread (126 at
# 2048), an SM has 64K, so 16 // num_warps programs per SM. Backward (kernel + column sums) against
# a device copy: layernorm 2048 0.0598 ms, 0.83 (the previous kernel: 0.0733 ms, 0.68); rmsnorm
# 2048 0.84; layernorm / rmsnorm 4096 0.82 / 0.83. Measured slower at 2048: 3, 5 or 8 programs per
# SM (0.78, 0.68, 0.79), 8 warps (0.72), no prefetch with 5 programs per SM (0.65), two rows a step
# (0.56), a double-buffered prefetch (0.73), clip shares summed per column instead of per row (0.77).
_FWD_TILE, _FWD_PER_THREAD = 4096, 32
_BWD_TILE, _BWD_PER_THREAD = 1024, 16
_RESIDENT_WARPS_PER_SM = 16    # 64K registers / (128 per thread * 32 threads per warp)
_SUM_TILE = 8192               # second stage: partials summed per program and step, in
_SUM_ROWS = 512                # tiles of up to 512 partials x 16 columns (H200, 528 x 2050 partials:
                               # 2.8 us, 3.5 in tiles of 256 x 32)


# ---------------------------------------------------------------------------------------------
# PyTorch reference (what CPU training runs): the same fp32 operations as the kernels
# ---------------------------------------------------------------------------------------------

def _stats_torch(v, eps, center):
    """Per-row (mean or None, rstd) of fp32 rows v."""
    mean = v.mean(-1) if center else None
    d = v - mean[:, None] if center else v
    return mean, 1.0 / torch.sqrt((d * d).mean(-1) + eps)


def _affine_torch(v, mean, rstd, weight, bias):
    """(xnorm, y) of fp32 rows v from their stats."""
    xnorm = (v - mean[:, None] if mean is not None else v) * rstd[:, None]
    y = xnorm * weight.float()
    return xnorm, (y + bias.float() if bias is not None else y)


def _forward_torch(x2d, weight, bias, clip, eps, center, bits, clipped):
    v = x2d.float()
    mean, rstd = _stats_torch(v, eps, center)
    _, y = _affine_torch(v, mean, rstd, weight, bias)
    if clipped is not None:
        clipped += clipped_torch(y, clip)
    return quantize_torch(y, clip, bits).to(x2d.dtype), mean, rstd


def _backward_torch(x2d, g, weight, bias, clip, mean, rstd, bits):
    xnorm, y = _affine_torch(x2d.float(), mean, rstd, weight, bias)
    dy, dclip = quantize_grad_torch(y, g.float(), clip, bits)
    dxhat = dy * weight.float()
    inner = dxhat - xnorm * (dxhat * xnorm).mean(-1, keepdim=True)
    if mean is not None:
        inner = inner - dxhat.mean(-1, keepdim=True)
    dx = (rstd[:, None] * inner).to(x2d.dtype)
    db = dy.sum(0).to(bias.dtype) if bias is not None else None
    return dx, (dy * xnorm).sum(0).to(weight.dtype), db, dclip.to(clip.dtype)


# ---------------------------------------------------------------------------------------------
# Triton: each program holds ROWS whole rows as one [ROWS, BLOCK_N] tile
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_params(w_ptr, b_ptr, cols, col_ok, HAS_BIAS: tl.constexpr):
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        b = w  # unused
    return w, b


@triton.jit
def _affine(x, mean, rstd, w, b, CENTER: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(xnorm, y) of a tile: one helper for both kernels, so backward's y is forward's."""
    if CENTER:
        x = x - mean[:, None]
    xnorm = x * rstd[:, None]
    y = xnorm * w[None, :]
    if HAS_BIAS:
        y = y + b[None, :]
    return xnorm, y


@triton.jit
def _add4(a1, a2, a3, a4, b1, b2, b3, b4):
    return a1 + b1, a2 + b2, a3 + b3, a4 + b4


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, clip_ptr, out_ptr, mean_ptr, rstd_ptr, count_ptr,
                n_rows, n_cols, n_cols_f, eps, n_steps, CENTER: tl.constexpr,
                HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """x_hat of ROWS rows, and their mean (CENTER) and rstd; COUNT: the number of clipped y
    at count_ptr[pid]. n_cols_f is n_cols as a float (an int arg of 1 would be a constexpr)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        mean = tl.math.div_rn(tl.sum(x, axis=1), n_cols_f)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        d = tl.where(mask, x - mean[:, None], 0.0)
    else:
        mean = tl.zeros([ROWS], dtype=tl.float32)  # unused
        d = x
    var = tl.math.div_rn(tl.sum(d * d, axis=1), n_cols_f)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    w, b = _load_params(w_ptr, b_ptr, cols, col_ok, HAS_BIAS)
    _, y = _affine(x, mean, rstd, w, b, CENTER, HAS_BIAS)
    c_lo, c_hi, s, step = load_clip(clip_ptr, n_steps)
    tl.store(out_ptr + offs, quantize(y, c_lo, c_hi, s, step).to(out_ptr.dtype.element_ty), mask=mask)
    if COUNT:
        clipped = (is_clipped(y, c_lo, c_hi) & mask).to(tl.int32)
        tl.store(count_ptr + tl.program_id(0), tl.sum(tl.sum(clipped, axis=1), axis=0))


@triton.jit
def _quantize_grad_inside(y, g, c_lo, c_hi, s, inv_n):
    """(dy, g_out, to_hi): kernels.fake_quant.quantize_grad_torch's dv and dc_hi share, bit for bit, and
    g_out = g beyond either clip, whose sum less to_hi's is the sum of the dc_lo shares. Leaner:
    z is computed without the clamp, as only z inside the clips is used, where clamp(y) = y."""
    above = y >= c_hi
    below = y <= c_lo
    inside = ~(above | below)
    z = (y - c_lo) * s
    delta_g = tl.where(inside, (((z + _ROUND_MAGIC) - _ROUND_MAGIC) - z) * inv_n * g, 0.0)
    dy = tl.where(inside, g, 0.0)
    return dy, g - dy, tl.where(above, g, delta_g)


@triton.jit
def _load_rows(x_ptr, g_ptr, mean_ptr, rstd_ptr, start, end, tile, col_ok, n_cols,
               CENTER: tl.constexpr, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """x and g of rows [start, start + ROWS) below end, as stored (g = 0 off them: no shares), and
    their mean (CENTER) and rstd. EVEN: n_cols == BLOCK_N, no column mask."""
    rows = start + tl.arange(0, ROWS)
    row_ok = rows < end
    if EVEN:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & col_ok[None, :]
    base = start * n_cols
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    if CENTER:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    else:
        mean = rstd  # unused
    return (tl.load(x_ptr + base + tile, mask=mask, other=0.0),
            tl.load(g_ptr + base + tile, mask=mask, other=0.0), mean, rstd)


@triton.jit
def _bwd_kernel(x_ptr, g_ptr, w_ptr, b_ptr, clip_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr,
                n_rows, n_cols, n_cols_f, width, rows_per_program, n_steps, CENTER: tl.constexpr,
                HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN: tl.constexpr):
    """dx of rows_per_program rows, ROWS at a time. Row pid of the (programs, width) fp32 partials
    gets the program's sums: dw in [0, N), db in [N, 2N) (HAS_BIAS), dc_lo and dc_hi in the last
    two columns; sums over rows stay in registers until the program ends.

    On H200 the loop's instructions take about as long as its memory traffic, so both are kept
    down: the next rows' x, g and stats are loaded before the current ones are worked on (latency);
    w and b are held in registers; the clip shares ride on the row reduction that dx needs anyway
    (one exchange between warps per row, for four sums); dw and dx use explicit FMAs (the kernel
    is compiled without contraction, for y, which must round as in the forward)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    tile = tl.arange(0, ROWS)[:, None] * n_cols + cols[None, :]
    c_lo, c_hi, s, _ = load_clip(clip_ptr, n_steps)
    inv_n = tl.math.div_rn(1.0, n_steps)
    inv_cols = tl.math.div_rn(1.0, n_cols_f)
    w, b = _load_params(w_ptr, b_ptr, cols, col_ok, HAS_BIAS)
    acc_dw = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_out = tl.zeros([ROWS], dtype=tl.float32)
    acc_hi = tl.zeros([ROWS], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    x_next, g_next, mean_next, rstd_next = _load_rows(x_ptr, g_ptr, mean_ptr, rstd_ptr, start, end, tile,
                                                      col_ok, n_cols, CENTER, ROWS, EVEN)
    while start < end:  # not range(): the interpreter cannot iterate to a runtime bound
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < end
        x = x_next.to(tl.float32)
        g = g_next.to(tl.float32)
        mean = mean_next
        rstd = rstd_next
        x_next, g_next, mean_next, rstd_next = _load_rows(x_ptr, g_ptr, mean_ptr, rstd_ptr, start + ROWS, end,
                                                          tile, col_ok, n_cols, CENTER, ROWS, EVEN)
        xnorm, y = _affine(x, mean, rstd, w, b, CENTER, HAS_BIAS)
        dy, g_out, to_hi = _quantize_grad_inside(y, g, c_lo, c_hi, s, inv_n)
        acc_dw = tl.fma(dy, xnorm, acc_dw)
        if HAS_BIAS:
            acc_db += dy
        dxhat = dy * w[None, :]
        # one joint reduction: a single exchange between warps instead of four
        sum_dxhat, sum_dxhat_xnorm, sum_out, sum_hi = tl.reduce((dxhat, dxhat * xnorm, g_out, to_hi), 1, _add4)
        # dx = rstd * (dxhat - xnorm * mean(dxhat * xnorm) - mean(dxhat)), in two FMAs
        k_xnorm = -(rstd * (sum_dxhat_xnorm * inv_cols))
        if CENTER:
            k_one = -(rstd * (sum_dxhat * inv_cols))
            dx = tl.fma(dxhat, rstd[:, None], tl.fma(xnorm, k_xnorm[:, None], k_one[:, None]))
        else:
            dx = tl.fma(dxhat, rstd[:, None], xnorm * k_xnorm[:, None])
        if EVEN:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & col_ok[None, :]
        tl.store(dx_ptr + start * n_cols + tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_out += sum_out
        acc_hi += sum_hi
        start += ROWS
    part = part_ptr + pid * width
    tl.store(part + cols, tl.sum(acc_dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(part + n_cols + cols, tl.sum(acc_db, axis=0), mask=col_ok)
    sum_hi = tl.sum(acc_hi, axis=0)
    tl.store(part + width - 2, tl.sum(acc_out, axis=0) - sum_hi)
    tl.store(part + width - 1, sum_hi)


@triton.jit
def _column_sums_kernel(part_ptr, dw_ptr, db_ptr, dclip_ptr, n_partials, n_cols, width,
                        HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Second stage: the partials' column sums in a fixed order (bitwise repeatable), each stored
    in its gradient's dtype: one launch for dw, db and dclip."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < width
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    start = 0
    while start < n_partials:
        rows = start + tl.arange(0, ROWS)
        mask = (rows < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + rows[:, None] * width + cols[None, :], mask=mask, other=0.0)
        start += ROWS
    total = tl.sum(acc, axis=0)
    tl.store(dw_ptr + cols, total.to(dw_ptr.dtype.element_ty), mask=cols < n_cols)
    if HAS_BIAS:
        tl.store(db_ptr + cols - n_cols, total.to(db_ptr.dtype.element_ty),
                 mask=(cols >= n_cols) & (cols < 2 * n_cols))
    tl.store(dclip_ptr + cols - (width - 2), total.to(dclip_ptr.dtype.element_ty),
             mask=(cols >= width - 2) & col_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _launch_config(n_cols, tile, per_thread, rows, num_warps):
    """ROWS, BLOCK_N and num_warps (4 to 16) for a tile of about `tile` elements, `per_thread` per
    thread; explicit rows / num_warps override (the benchmark's sweep)."""
    block = triton.next_power_of_2(n_cols)
    rows = rows or max(1, tile // block)
    num_warps = num_warps or min(16, max(4, rows * block // (32 * per_thread)))
    return dict(ROWS=rows, BLOCK_N=block, num_warps=num_warps)


def _forward_triton(x2d, weight, bias, clip, eps, center, bits, clipped, rows=None, num_warps=None):
    n_rows, n_cols = x2d.shape
    cfg = _launch_config(n_cols, _FWD_TILE, _FWD_PER_THREAD, rows, num_warps)
    grid = (triton.cdiv(n_rows, cfg["ROWS"]),)
    out = torch.empty_like(x2d)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    mean = torch.empty_like(rstd) if center else None
    counts = torch.empty(grid[0], dtype=torch.int32, device=x2d.device) if clipped is not None else None
    _fwd_kernel[grid](x2d, weight, bias if bias is not None else weight, clip, out,
                      mean if center else rstd, rstd, counts if counts is not None else rstd,
                      n_rows, n_cols, float(n_cols), eps, float(2 ** bits - 1), CENTER=center,
                      HAS_BIAS=bias is not None, COUNT=clipped is not None, enable_fp_fusion=False,
                      **cfg)
    if clipped is not None:
        add_clipped(clipped, counts)
    return out, mean, rstd


def _backward_triton(x2d, g, weight, bias, clip, mean, rstd, bits, rows=None, num_warps=None,
                     rows_per_program=None):
    """rows_per_program defaults to what makes one wave of resident programs."""
    n_rows, n_cols = x2d.shape
    cfg = _launch_config(n_cols, _BWD_TILE, _BWD_PER_THREAD, rows, num_warps)
    if rows_per_program is None:
        programs = max(1, _RESIDENT_WARPS_PER_SM // cfg["num_warps"]) * _sm_count(x2d.device)
        rows_per_program = cfg["ROWS"] * max(1, triton.cdiv(n_rows, cfg["ROWS"] * programs))
    n_programs = max(1, triton.cdiv(n_rows, rows_per_program))
    width = (2 if bias is not None else 1) * n_cols + 2
    dx = torch.empty_like(x2d)
    part = torch.empty(n_programs, width, dtype=torch.float32, device=x2d.device)
    _bwd_kernel[(n_programs,)](x2d, g, weight, bias if bias is not None else weight, clip,
                               mean if mean is not None else rstd, rstd, dx, part, n_rows, n_cols,
                               float(n_cols), width, rows_per_program, float(2 ** bits - 1),
                               CENTER=mean is not None, HAS_BIAS=bias is not None,
                               EVEN=cfg["BLOCK_N"] == n_cols, enable_fp_fusion=False, **cfg)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias) if bias is not None else None
    dclip = torch.empty_like(clip)
    rows2 = min(triton.next_power_of_2(n_programs), _SUM_ROWS)
    block = _SUM_TILE // rows2
    _column_sums_kernel[(triton.cdiv(width, block),)](
        part, dw, db if db is not None else dw, dclip, n_programs, n_cols, width,
        HAS_BIAS=bias is not None, ROWS=rows2, BLOCK=block, num_warps=8)
    return dx, dw, db, dclip


_FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

class _NormFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, clip, eps, center, bits, impl, clipped):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        x_hat, mean, rstd = _FORWARD[impl](x2d, weight, bias, clip, eps, center, bits, clipped)
        ctx.save_for_backward(x2d, weight, bias, clip, mean, rstd)
        ctx.bits, ctx.impl, ctx.shape = bits, impl, x.shape
        return x_hat.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        x2d, weight, bias, clip, mean, rstd = ctx.saved_tensors
        g2d = g.reshape(x2d.shape).contiguous()
        dx, dw, db, dclip = _BACKWARD[ctx.impl](x2d, g2d, weight, bias, clip, mean, rstd, ctx.bits)
        return dx.view(ctx.shape), dw, db, dclip, None, None, None, None, None


@torch.library.custom_op("qat_kernels::norm_fake_quant", mutates_args=())
def _norm_fake_quant_op(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, clip: torch.Tensor,
                        eps: float, center: bool, bits: int, impl: str,
                        count: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What torch.compile sees of _NormFakeQuant's forward: (x_hat, mean (empty for rmsnorm), rstd,
    the clipped count (empty unless counted))."""
    clipped = new_counter(x2d, count)
    x_hat, mean, rstd = _FORWARD[impl](x2d, weight, bias, clip, eps, center, bits, clipped if count else None)
    return x_hat, mean if center else rstd.new_empty(0), rstd, clipped


@_norm_fake_quant_op.register_fake
def _(x2d, weight, bias, clip, eps, center, bits, impl, count):
    rstd = x2d.new_empty(x2d.shape[0], dtype=torch.float32)
    return (torch.empty_like(x2d, memory_format=torch.contiguous_format),
            torch.empty_like(rstd) if center else rstd.new_empty(0), rstd, new_counter(x2d, count))


@torch.library.custom_op("qat_kernels::norm_fake_quant_backward", mutates_args=())
def _norm_fake_quant_backward_op(x2d: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 clip: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, bits: int,
                                 impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db (empty without a bias), dclip); mean is empty for rmsnorm."""
    dx, dw, db, dclip = _BACKWARD[impl](x2d, g, weight, bias, clip, mean if mean.numel() else None, rstd, bits)
    return dx, dw, db if bias is not None else weight.new_empty(0), dclip


@_norm_fake_quant_backward_op.register_fake
def _(x2d, g, weight, bias, clip, mean, rstd, bits, impl):
    return (torch.empty_like(x2d), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(0), torch.empty_like(clip))


def _norm_setup(ctx, inputs, output):
    x2d, weight, bias, clip, _, _, bits, impl, _ = inputs
    _, mean, rstd, _ = output
    ctx.save_for_backward(x2d, weight, bias, clip, mean, rstd)
    ctx.bits, ctx.impl = bits, impl


def _norm_grad(ctx, g, *_):
    x2d, weight, bias, clip, mean, rstd = ctx.saved_tensors
    dx, dw, db, dclip = _norm_fake_quant_backward_op(x2d, g.contiguous(), weight, bias, clip, mean, rstd,
                                                     ctx.bits, ctx.impl)
    return dx, dw, db if bias is not None else None, dclip, None, None, None, None, None


_norm_fake_quant_op.register_autograd(_norm_grad, setup_context=_norm_setup)


def _check_param(name, p, n_cols, x):
    if not isinstance(p, torch.Tensor) or not p.is_floating_point() or tuple(p.shape) != (n_cols,):
        raise TypeError(f"norm_fake_quant: {name} must be a float tensor of shape ({n_cols},) (the "
                        f"input's last dim), got {getattr(p, 'dtype', type(p))} of shape "
                        f"{tuple(getattr(p, 'shape', ()))}")
    if p.device != x.device:
        raise ValueError(f"norm_fake_quant: {name} is on {p.device} but the input is on {x.device}")


def norm_fake_quant(x, weight, bias, eps, kind, clip, bits, impl=None, clipped=None):
    """quantize(norm(x) * weight + bias): the next linear's fake-quantized input, in x's dtype.

    x: [..., N] bf16/fp16/fp32, normalized over the last dim. kind: "layernorm" (bias or None) or
    "rmsnorm" (no bias). weight, bias: [N] of any float dtype (math in fp32; their gradients come
    back in their own dtypes). clip: (c_lo, c_hi), float tensor of shape (2,). Differentiable in x,
    weight, bias and clip. clipped: optional 0-dim int64 counter that gets the number of y elements
    outside the clips added. impl: None (Triton on CUDA, torch otherwise), "triton" or "torch".
    """
    check_quant_args("norm_fake_quant", x, clip, bits)
    check_clipped(clipped, x)
    if kind not in KINDS:
        raise ValueError(f"norm_fake_quant: kind must be one of {KINDS}, got {kind!r}")
    n_cols = x.shape[-1]
    if not 1 <= n_cols <= MAX_N:
        raise ValueError(f"norm_fake_quant: the normalized (last) dim must be in [1, {MAX_N}], got {n_cols}")
    _check_param("weight", weight, n_cols, x)
    if bias is not None:
        if kind == "rmsnorm":
            raise ValueError("norm_fake_quant: rmsnorm takes no bias")
        _check_param("bias", bias, n_cols, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"norm_fake_quant: eps must be a number >= 0, got {eps!r}")
    if torch.compiler.is_compiling():
        x_hat, _, _, count = _norm_fake_quant_op(
            x.reshape(-1, n_cols).contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
            clip, float(eps), kind == "layernorm", bits, resolve_impl(impl, x), clipped is not None)
        if clipped is not None:
            clipped += count
        return x_hat.view(x.shape)
    return _NormFakeQuant.apply(x, weight, bias, clip, float(eps), kind == "layernorm", bits,
                                resolve_impl(impl, x), clipped)
