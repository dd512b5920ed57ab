"""The MLP activation fused with the fake quantizer of fc2's input (DESIGN.md, "QAT of linear-layer
inputs").

Unfused, the widest activation of the model (4x hidden) costs seven extra memory passes: the
activation writes h, the quantizer reads h and writes x_hat, and backward reads h again, writes
dh, and the activation's backward reads dh. Fused, forward reads the fc1 output a and writes only
x_hat (fc2 keeps x_hat for its weight gradient; a is saved, as the activation's own backward would
keep it); backward reads a and the gradient of x_hat, recomputes h in fp32 exactly as forward did,
and writes da: the memory traffic of the plain activation. h is never stored, nor rounded to a's
dtype before it is quantized.

kind "gelu":   h = GELU with the tanh approximation (torch's approximate="tanh"), h the shape of a.
kind "swiglu": a = [..., 2F] of interleaved (gate, up) pairs, h = silu(gate) * up of shape [..., F].
Both are h = y(x) * up with y(x) = x * sigmoid(t(x)) and up = 1 for GELU: t = x for SiLU, and
0.5 * x * (1 + tanh(u)) = x * sigmoid(2u) for GELU. The sigmoid form needs no tanh (libdevice
has no interpreter fallback) and, from one exp(-|t|), gives sigmoid(t) and 1 - sigmoid(t) without
overflow or cancellation (torch's 1 + tanh(u) cancels for negative u).

The quantizer math is kernels.fake_quant's (load_clip / quantize and the backward's leaner
_quantize_grad_acc, the same dx; their PyTorch twins); clip gradients are summed per program, then
in a fixed order: no atomics.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .fake_quant import (_acc_scale, _finish_clip_sums, _inv_steps, _neg_zeros, _quantize_grad_acc, new_counter,
                         add_clipped, check_clipped, check_quant_args, clip_grad_from_partials,
                         clipped_torch, is_clipped, load_clip, quantize, quantize_grad_torch,
                         quantize_torch, resolve_impl)

KINDS = ("gelu", "swiglu")
# torch's tanh-GELU, u = beta * (x + kappa * x^3) with beta = sqrt(2 / pi), kappa = 0.044715, as
# x * sigmoid(t) with t = 2u: in log2 units t * log2(e) = x * (_T1 + _T2 * x^2); dt/dx = _D1 + _D2 * x^2.
_BETA, _KAPPA, _LOG2E = 0.7978845608028654, 0.044715, 1.4426950408889634
_T1 = tl.constexpr(2 * _BETA * _LOG2E)
_T2 = tl.constexpr(2 * _BETA * _KAPPA * _LOG2E)
_D1 = tl.constexpr(2 * _BETA)
_D2 = tl.constexpr(6 * _BETA * _KAPPA)
_SILU_T1 = tl.constexpr(_LOG2E)
# Launch settings measured on one H200 (bf16; GELU on 16384 x 8192, SwiGLU on 16384 x 16384):
# forward 4096 elements of h per program on 4 warps. Backward (CUDA-graph replay, the previous
# kernel beside it, settings as in bench/kernel_sweep.py; 2026-11-24): tiles of 1024 elements of h, the next tile's loads
# issued before the current tile's math; GELU 16 tiles per program on 4 warps: 0.211-0.220 ms =
# 0.87-0.90 of a device copy (was 0.243-0.250 ms = 0.77-0.79; bench/kernel_bandwidth.py 0.222 ms, on par with
# the plain gelu_backward), where 8 or 32 tiles, 512-element tiles on 2 warps, or no prefetch
# measured within 1-3%, and 2048-4096-element tiles or 8 warps 3-30% slower; SwiGLU (whose tiles
# read twice the input) 8 tiles on 8 warps: 0.324 ms (was 0.337).
_FWD_BLOCK, _FWD_WARPS = 4096, 4
_BWD_BLOCK, _BWD_PREFETCH = 1024, True
_BWD_TILES = {False: 16, True: 8}      # by swiglu
_BWD_WARPS = {False: 4, True: 8}


# ---------------------------------------------------------------------------------------------
# PyTorch reference (fp32 math; what CPU training runs)
# ---------------------------------------------------------------------------------------------

def _split_torch(a, swiglu):
    """(x, up) in fp32: the input of y and SwiGLU's multiplier (1 for GELU)."""
    a = a.float()
    return a.unflatten(-1, (-1, 2)).unbind(-1) if swiglu else (a, 1.0)


def _gated_torch(x, swiglu, grad=False):
    """y = x * sigmoid(t(x)), and dy/dx if grad (the twin of _gated)."""
    xx = x * x
    t2 = x * _SILU_T1.value if swiglu else x * (_T1.value + _T2.value * xx)
    e = torch.exp2(torch.clamp_max(-t2, 126.0))
    sig = 1.0 / (1.0 + e)
    y = x * sig
    if not grad:
        return y
    dt = 1.0 if swiglu else _D1.value + _D2.value * xx
    return y, sig + y * (e * sig) * dt


def _activation_torch(a, swiglu):
    """h = act(a) in fp32, before quantization."""
    x, up = _split_torch(a, swiglu)
    return _gated_torch(x, swiglu) * up


def _forward_torch(a, clip, bits, swiglu, clipped=None):
    h = _activation_torch(a, swiglu)
    if clipped is not None:
        clipped += clipped_torch(h, clip)
    return quantize_torch(h, clip, bits).to(a.dtype)


def _backward_torch(a, g, clip, bits, swiglu):
    x, up = _split_torch(a, swiglu)
    y, dy = _gated_torch(x, swiglu, grad=True)
    dh, dclip = quantize_grad_torch(y * up, g.float(), clip, bits)
    da = torch.stack([dh * up * dy, dh * y], -1).flatten(-2) if swiglu else dh * dy
    return da.to(a.dtype), dclip.to(clip.dtype)


# ---------------------------------------------------------------------------------------------
# Triton: programs over the flat index of h; h[i] reads a[i] (GELU) or the pair a[2i], a[2i + 1]
# ---------------------------------------------------------------------------------------------

@triton.jit
def _pairs(start, n, BLOCK: tl.constexpr):
    """Offsets and mask of the 2 * BLOCK elements of a behind h[start : start + BLOCK]: one
    contiguous range, so that loads and stores are 16 bytes wide; reshaped to (gate, up) pairs."""
    offs = 2 * start + tl.arange(0, 2 * BLOCK)
    return offs, offs < 2 * n


@triton.jit
def _load_input(a_ptr, start, n, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    """(x, up) in fp32 for h[start : start + BLOCK]; masked-off lanes read 0."""
    if SWIGLU:
        offs, mask = _pairs(start, n, BLOCK)
        pairs = tl.reshape(tl.load(a_ptr + offs, mask=mask, other=0.0), [BLOCK, 2])
        x, up = tl.split(pairs.to(tl.float32))
    else:
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(a_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        up = 1.0
    return x, up


@triton.jit
def _rcp(x, ASM: tl.constexpr):
    """1 / x for 1 <= x <= 2^126, bitwise as `1.0 / x` computes it on the GPU: div.full.f32 is
    rcp.approx times a range scale that is 1 up to 2^126, so one MUFU.RCP instead of five
    instructions. ASM: inline PTX, which the interpreter lacks (it divides)."""
    if ASM:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _gated(x, SWIGLU: tl.constexpr, ASM: tl.constexpr = False):
    """(y, dy/dx) for y = x * sigmoid(t(x)); forward's unused dy is compiled away. e = exp(-t) is
    capped at 2^126 so that e * sig = 1 - sig stays finite (and free of cancellation), and so that
    1 + e is in _rcp's range."""
    if SWIGLU:
        t2 = x * _SILU_T1
        dt = 1.0
    else:
        xx = x * x
        t2 = x * (_T1 + _T2 * xx)
        dt = _D1 + _D2 * xx
    e = tl.exp2(tl.minimum(-t2, 126.0))
    sig = _rcp(1.0 + e, ASM)
    y = x * sig
    return y, sig + y * (e * sig) * dt


@triton.jit
def _fwd_kernel(a_ptr, clip_ptr, out_ptr, count_ptr, n, n_steps, SWIGLU: tl.constexpr,
                COUNT: tl.constexpr, BLOCK: tl.constexpr):
    c_lo, c_hi, s, step = load_clip(clip_ptr, n_steps)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    x, up = _load_input(a_ptr, start, n, SWIGLU, BLOCK)
    y, _ = _gated(x, SWIGLU)
    h = y * up
    tl.store(out_ptr + offs, quantize(h, c_lo, c_hi, s, step).to(out_ptr.dtype.element_ty), mask=mask)
    if COUNT:
        tl.store(count_ptr + tl.program_id(0), tl.sum((is_clipped(h, c_lo, c_hi) & mask).to(tl.int32), axis=0))


@triton.jit
def _bf16_pair(w):
    """The two bf16 of 32-bit words w as fp32: one instruction each (a shift, a mask)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(a_ptr, g_ptr, start, n, more, SWIGLU: tl.constexpr, PAIRS: tl.constexpr, EVEN: tl.constexpr,
               BLOCK: tl.constexpr):
    """(x, up, g) in fp32 of the tile at h[start:]; `more` (a scalar) masks the whole tile. PAIRS
    (GELU, bf16 a and g, even n): read as 32-bit words, the tile is [BLOCK // 2, 2]."""
    if PAIRS:
        words = start // 2 + tl.arange(0, BLOCK // 2)
        mask = more if EVEN else (words < n // 2) & more
        x0, x1 = _bf16_pair(tl.load(a_ptr.to(tl.pointer_type(tl.int32)) + words, mask=mask, other=0))
        g0, g1 = _bf16_pair(tl.load(g_ptr.to(tl.pointer_type(tl.int32)) + words, mask=mask, other=0))
        x, up, g = tl.join(x0, x1), 1.0, tl.join(g0, g1)
    else:
        offs = start + tl.arange(0, BLOCK)
        mask = more if EVEN else (offs < n) & more
        if SWIGLU:
            pair_offs = 2 * start + tl.arange(0, 2 * BLOCK)
            pair_mask = more if EVEN else (pair_offs < 2 * n) & more
            pairs = tl.reshape(tl.load(a_ptr + pair_offs, mask=pair_mask, other=0.0), [BLOCK, 2])
            x, up = tl.split(pairs.to(tl.float32))
        else:
            x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            up = 1.0
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x, up, g


@triton.jit
def _store_tile(da_ptr, start, n, dx, du, SWIGLU: tl.constexpr, PAIRS: tl.constexpr, EVEN: tl.constexpr,
                BLOCK: tl.constexpr):
    """da of the tile at h[start:]: dx (and SwiGLU's du, interleaved)."""
    if SWIGLU:
        offs, mask = _pairs(start, n, BLOCK)
        da = tl.reshape(tl.join(dx, du), [2 * BLOCK])
    else:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        da = tl.reshape(dx, [BLOCK]) if PAIRS else dx
    if EVEN:
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty))
    else:
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(a_ptr, g_ptr, clip_ptr, da_ptr, partial_ptr, n, n_steps, inv_n, SWIGLU: tl.constexpr,
                PAIRS: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
                TRIGGER: tl.constexpr, TILES: tl.constexpr, BLOCK: tl.constexpr):
    """da for TILES tiles of h, and the program's partial sums of dc_lo, dc_hi at partial_ptr[0, pid]
    and [1, pid] (shares summed in registers: one cross-warp reduction per program). PREFETCH: each
    tile's loads are issued before the previous tile's math, the first before the clip is read."""
    if TRIGGER:   # the second stage may launch (and wait in gdc_wait) once every program has started
        gdc_launch_dependents()
    start = tl.program_id(0).to(tl.int64) * (TILES * BLOCK)
    if PREFETCH:
        x_next, up_next, g_next = _load_tile(a_ptr, g_ptr, start, n, True, SWIGLU, PAIRS, EVEN, BLOCK)
    c_lo, c_hi, s, _ = load_clip(clip_ptr, n_steps)
    s = _acc_scale(c_lo, c_hi, s)
    if PAIRS:
        acc_a = _neg_zeros([BLOCK // 2, 2])
        acc_b = _neg_zeros([BLOCK // 2, 2])
        acc_d = _neg_zeros([BLOCK // 2, 2])
    else:
        acc_a = _neg_zeros([BLOCK])
        acc_b = _neg_zeros([BLOCK])
        acc_d = _neg_zeros([BLOCK])
    for t in range(TILES):
        tile = start + t * BLOCK
        if PREFETCH:
            x, up, g = x_next, up_next, g_next
            x_next, up_next, g_next = _load_tile(a_ptr, g_ptr, tile + BLOCK, n, t + 1 < TILES, SWIGLU, PAIRS,
                                                 EVEN, BLOCK)
        else:
            x, up, g = _load_tile(a_ptr, g_ptr, tile, n, True, SWIGLU, PAIRS, EVEN, BLOCK)
        y, dy = _gated(x, SWIGLU, ASM)
        dh, acc_a, acc_b, acc_d = _quantize_grad_acc(y * up, g, c_lo, c_hi, s, acc_a, acc_b, acc_d)
        _store_tile(da_ptr, tile, n, dh * up * dy, dh * y, SWIGLU, PAIRS, EVEN, BLOCK)
    lo, hi = _finish_clip_sums(acc_a, acc_b, acc_d, inv_n, BLOCK)
    pid = tl.program_id(0)
    tl.store(partial_ptr + pid, lo)
    tl.store(partial_ptr + tl.num_programs(0) + pid, hi)


def _out_shape(a, swiglu):
    return (*a.shape[:-1], a.shape[-1] // 2) if swiglu else a.shape


def _forward_triton(a, clip, bits, swiglu, clipped=None, block=_FWD_BLOCK, num_warps=_FWD_WARPS):
    """a contiguous. Launch settings are arguments only so that the benchmark can tune them."""
    out = torch.empty(_out_shape(a, swiglu), dtype=a.dtype, device=a.device)
    n = out.numel()
    grid = (triton.cdiv(n, block),)
    counts = torch.empty(grid[0], dtype=torch.int32, device=a.device) if clipped is not None else out
    _fwd_kernel[grid](a, clip, out, counts, n, float(2 ** bits - 1), SWIGLU=swiglu,
                      COUNT=clipped is not None, BLOCK=block, num_warps=num_warps)
    if clipped is not None:
        add_clipped(clipped, counts)
    return out


def _backward_triton(a, g, clip, bits, swiglu, block=_BWD_BLOCK, tiles=None, num_warps=None,
                     prefetch=_BWD_PREFETCH, pairs=True, trigger=True):
    """a contiguous; g the gradient of x_hat. Launch settings as in _forward_triton (None: the
    measured default for the kind); pairs: GELU reads bf16 as 32-bit words where it can; trigger
    (on CUDA): the programs let the second stage launch early (gdc_launch_dependents)."""
    g = g.contiguous()
    da = torch.empty_like(a)
    n = g.numel()
    tiles = tiles or _BWD_TILES[swiglu]
    grid = (triton.cdiv(n, block * tiles),)
    partials = torch.empty(2, grid[0], dtype=torch.float32, device=a.device)
    pairs = (pairs and not swiglu and n % 2 == 0 and a.dtype == g.dtype == torch.bfloat16
             and a.data_ptr() % 4 == 0 and g.data_ptr() % 4 == 0)
    _bwd_kernel[grid](a, g, clip, da, partials, n, float(2 ** bits - 1), _inv_steps(bits), SWIGLU=swiglu,
                      PAIRS=pairs, EVEN=n % (block * tiles) == 0, ASM=a.is_cuda, PREFETCH=prefetch,
                      TRIGGER=trigger and a.is_cuda, TILES=tiles, BLOCK=block,
                      num_warps=num_warps or _BWD_WARPS[swiglu])
    return da, clip_grad_from_partials(partials, clip.dtype)


_FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

class _ActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, clip, swiglu, bits, impl, clipped):
        ctx.save_for_backward(a, clip)
        ctx.swiglu, ctx.bits, ctx.impl = swiglu, bits, impl
        return _FORWARD[impl](a, clip, bits, swiglu, clipped)

    @staticmethod
    def backward(ctx, g):
        a, clip = ctx.saved_tensors
        da, dclip = _BACKWARD[ctx.impl](a, g, clip, ctx.bits, ctx.swiglu)
        return da, dclip, None, None, None, None


@torch.library.custom_op("qat_kernels::act_fake_quant", mutates_args=())
def _act_fake_quant_op(a: torch.Tensor, clip: torch.Tensor, swiglu: bool, bits: int, impl: str,
                       count: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What torch.compile sees of _ActFakeQuant's forward: (x_hat, the clipped count or empty)."""
    clipped = new_counter(a, count)
    return _FORWARD[impl](a, clip, bits, swiglu, clipped if count else None), clipped


@_act_fake_quant_op.register_fake
def _(a, clip, swiglu, bits, impl, count):
    return a.new_empty(_out_shape(a, swiglu)), new_counter(a, count)


@torch.library.custom_op("qat_kernels::act_fake_quant_backward", mutates_args=())
def _act_fake_quant_backward_op(a: torch.Tensor, g: torch.Tensor, clip: torch.Tensor, bits: int, swiglu: bool,
                                impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _BACKWARD[impl](a, g, clip, bits, swiglu)


@_act_fake_quant_backward_op.register_fake
def _(a, g, clip, bits, swiglu, impl):
    return torch.empty_like(a), torch.empty_like(clip)


def _act_setup(ctx, inputs, output):
    a, clip, swiglu, bits, impl, _ = inputs
    ctx.save_for_backward(a, clip)
    ctx.swiglu, ctx.bits, ctx.impl = swiglu, bits, impl


def _act_grad(ctx, g, _):
    a, clip = ctx.saved_tensors
    return *_act_fake_quant_backward_op(a, g, clip, ctx.bits, ctx.swiglu, ctx.impl), None, None, None, None


_act_fake_quant_op.register_autograd(_act_grad, setup_context=_act_setup)


def act_fake_quant(a, kind, clip, bits, impl=None, clipped=None):
    """x_hat = fake_quant(act(a)) on the learned clip range clip = (c_lo, c_hi), differentiable in
    a and clip; saves only a and clip for backward.

    a: fc1's output [..., K] in bf16/fp16/fp32 (made contiguous). kind "gelu" (tanh approximation):
    x_hat is [..., K]; kind "swiglu": K = 2F of interleaved (gate, up) pairs, x_hat is [..., F] =
    fake_quant(silu(gate) * up). clip: float tensor of shape (2,); its gradient comes back in its
    dtype, da in a's. clipped: optional 0-dim int64 counter that gets the number of h elements
    outside the clips added. impl: None (Triton on CUDA, torch otherwise), "triton" or "torch".
    """
    check_quant_args("act_fake_quant", a, clip, bits)
    check_clipped(clipped, a)
    if kind not in KINDS:
        raise ValueError(f"act_fake_quant: kind must be one of {KINDS}, got {kind!r}")
    swiglu = kind == "swiglu"
    if swiglu and a.shape[-1] % 2:
        raise ValueError(f"act_fake_quant: swiglu needs an even last dim of (gate, up) pairs, got {a.shape[-1]}")
    if torch.compiler.is_compiling():
        x_hat, count = _act_fake_quant_op(a.contiguous(), clip, swiglu, bits, resolve_impl(impl, a), clipped is not None)
        if clipped is not None:
            clipped += count
        return x_hat
    return _ActFakeQuant.apply(a.contiguous(), clip, swiglu, bits, resolve_impl(impl, a), clipped)
