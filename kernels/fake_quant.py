"""Learned-clip asymmetric fake quantization (DESIGN.md, "QAT of linear-layer inputs").

Forward:  s = n / (c_hi - c_lo),  z = (clamp(x, c_lo, c_hi) - c_lo) * s,
          x_hat = round(z) / s + c_lo   (round half to even, n = 2^bits - 1).
Backward: the exact derivative of the straight-through surrogate
          x_hat = clamp(x, c_lo, c_hi) + r / s with r = round(z) - z held constant.

Each operation has a fused Triton kernel and a plain-PyTorch reference of the same fp32 math.
Both divide once per call, not per element (IEEE division would cost more than the memory
traffic): round(z) / s is computed as round(z) * ((c_hi - c_lo) / n), within one fp32 ulp.
Only x is kept for backward (x_hat is recomputed or never needed), so a quantized layer stores
nothing beyond its input.
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
_BLOCK = 4096
_REDUCE_BLOCK = 8192  # one pass of the second stage per 2^25 elements


def resolve_impl(impl, x: torch.Tensor) -> str:
    """Pick the implementation for every kernel in this package: Triton on CUDA, torch elsewhere.

    "triton" can be forced on CPU tensors, which only works under TRITON_INTERPRET=1 (tests).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl is None:
        return "triton" if x.is_cuda else "torch"
    return impl


def _check_args(x, c_lo, c_hi, bits):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fake_quant: x must be a bf16/fp16/fp32 tensor, got "
                        f"{getattr(x, 'dtype', type(x))}")
    for name, c in (("c_lo", c_lo), ("c_hi", c_hi)):
        if not isinstance(c, torch.Tensor) or c.dtype != torch.float32 or c.dim() != 0:
            raise TypeError(f"fake_quant: {name} must be a 0-dim fp32 tensor, got "
                            f"{getattr(c, 'dtype', type(c))} of shape {getattr(c, 'shape', None)}")
        if c.device != x.device:
            raise ValueError(f"fake_quant: {name} is on {c.device} but x is on {x.device}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"fake_quant: bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    msg = "fake_quant: clip values need c_lo < c_hi"
    if x.is_cuda:  # checked on the device: a host check would synchronize every layer call
        torch._assert_async(c_lo < c_hi, msg)
    elif not bool(c_lo < c_hi):
        raise ValueError(f"{msg}, got c_lo={c_lo.item()} c_hi={c_hi.item()}")


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def _scaled_torch(x, c_lo, c_hi, bits):
    """fp32 x, the grid step 1/s and the unrounded grid coordinate z."""
    xf = x.float()
    width, n = c_hi - c_lo, c_hi.new_tensor(2 ** bits - 1)
    z = (torch.clamp(xf, c_lo, c_hi) - c_lo) * (n / width)
    return xf, width / n, z


def _forward_torch(x, c_lo, c_hi, bits):
    _, step, z = _scaled_torch(x, c_lo, c_hi, bits)
    return (torch.round(z) * step + c_lo).to(x.dtype)


def _backward_torch(x, g, c_lo, c_hi, bits):
    xf, _, z = _scaled_torch(x, c_lo, c_hi, bits)
    gf = g.float()
    above, below = xf >= c_hi, xf <= c_lo
    inside = ~(above | below)
    delta_g = torch.where(inside, (torch.round(z) - z) * (1.0 / (2 ** bits - 1)) * gf, 0.0)
    dx = torch.where(inside, gf, 0.0).to(x.dtype)
    dc_hi = torch.where(above, gf, 0.0).sum() + delta_g.sum()
    dc_lo = torch.where(below, gf, 0.0).sum() - delta_g.sum()
    return dx, dc_lo, dc_hi


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

@triton.jit
def _clip_params(c_lo_ptr, c_hi_ptr, n_steps):
    """The clips, s and the grid step 1/s. Divisions are per program: per element they would cost
    more than the memory traffic."""
    c_lo = tl.load(c_lo_ptr)
    c_hi = tl.load(c_hi_ptr)
    s = tl.math.div_rn(n_steps, c_hi - c_lo)  # IEEE division, as torch does it
    step = tl.math.div_rn(c_hi - c_lo, n_steps)
    return c_lo, c_hi, s, step


@triton.jit
def _fwd_kernel(x_ptr, c_lo_ptr, c_hi_ptr, out_ptr, numel, n_steps, BLOCK: tl.constexpr):
    c_lo, c_hi, s, step = _clip_params(c_lo_ptr, c_hi_ptr, n_steps)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (tl.minimum(tl.maximum(x, c_lo), c_hi) - c_lo) * s
    x_hat = ((z + _ROUND_MAGIC) - _ROUND_MAGIC) * step + c_lo
    tl.store(out_ptr + offs, x_hat.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, g_ptr, c_lo_ptr, c_hi_ptr, dx_ptr, partial_ptr, numel, n_steps,
                BLOCK: tl.constexpr):
    """dx for one block, plus its fp32 partial sums of dc_lo and dc_hi at partial_ptr[0, pid] and
    [1, pid]. Each element's contribution to both sums is formed first, so a program does two
    cross-warp reductions, not three."""
    c_lo, c_hi, s, _ = _clip_params(c_lo_ptr, c_hi_ptr, n_steps)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # g = 0 keeps the sums exact
    above = x >= c_hi
    below = x <= c_lo
    inside = ~(above | below)
    z = (tl.minimum(tl.maximum(x, c_lo), c_hi) - c_lo) * s
    delta = (((z + _ROUND_MAGIC) - _ROUND_MAGIC) - z) * tl.math.div_rn(1.0, n_steps)
    delta_g = tl.where(inside, delta * g, 0.0)
    tl.store(dx_ptr + offs, tl.where(inside, g, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(tl.where(below, g, -delta_g), axis=0))
    tl.store(partial_ptr + tl.num_programs(0) + pid, tl.sum(tl.where(above, g, delta_g), axis=0))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, BLOCK: tl.constexpr):
    """Second reduction stage: one program, fixed order, so the result is bitwise repeatable."""
    acc_lo = tl.zeros([BLOCK], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < n_partials:  # not range(): the interpreter cannot iterate to a runtime bound
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n_partials
        acc_lo += tl.load(partial_ptr + idx, mask=mask, other=0.0)
        acc_hi += tl.load(partial_ptr + n_partials + idx, mask=mask, other=0.0)
        start += BLOCK
    tl.store(out_ptr, tl.sum(acc_lo, axis=0))
    tl.store(out_ptr + 1, tl.sum(acc_hi, axis=0))


def _forward_triton(x, c_lo, c_hi, bits):
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    grid = (triton.cdiv(numel, _BLOCK),)
    _fwd_kernel[grid](x, c_lo, c_hi, out, numel, float(2 ** bits - 1), BLOCK=_BLOCK, num_warps=8)
    return out


def _backward_triton(x, g, c_lo, c_hi, bits, block=_BLOCK, num_warps=8):
    """Launch settings are arguments only so that bench/kernels_sweep.py can tune them."""
    x, g = x.contiguous(), g.contiguous()
    dx = torch.empty_like(x)
    numel = x.numel()
    n_programs = triton.cdiv(numel, block)
    partials = torch.empty(2, n_programs, dtype=torch.float32, device=x.device)
    _bwd_kernel[(n_programs,)](x, g, c_lo, c_hi, dx, partials, numel, float(2 ** bits - 1),
                               BLOCK=block, num_warps=num_warps)
    clip_grads = torch.empty(2, dtype=torch.float32, device=x.device)
    _sum_partials_kernel[(1,)](partials, clip_grads, n_programs, BLOCK=_REDUCE_BLOCK,
                               num_warps=16)
    return dx, clip_grads[0], clip_grads[1]


_FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def fake_quant_forward(x, c_lo, c_hi, bits, impl=None):
    """x_hat without autograd: for callers that recompute it from x in backward."""
    _check_args(x, c_lo, c_hi, bits)
    return _FORWARD[resolve_impl(impl, x)](x.detach(), c_lo.detach(), c_hi.detach(), bits)


def fake_quant_backward(x, g, c_lo, c_hi, bits, impl=None):
    """(dx, dc_lo, dc_hi) for upstream gradient g, from x alone; dx in x's dtype, clips fp32."""
    _check_args(x, c_lo, c_hi, bits)
    if g.shape != x.shape:
        raise ValueError(f"fake_quant: gradient shape {tuple(g.shape)} != x shape {tuple(x.shape)}")
    return _BACKWARD[resolve_impl(impl, x)](x.detach(), g, c_lo.detach(), c_hi.detach(), bits)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c_lo, c_hi, bits, impl):
        ctx.save_for_backward(x, c_lo, c_hi)
        ctx.bits, ctx.impl = bits, impl
        return _FORWARD[impl](x, c_lo, c_hi, bits)

    @staticmethod
    def backward(ctx, g):
        x, c_lo, c_hi = ctx.saved_tensors
        dx, dc_lo, dc_hi = _BACKWARD[ctx.impl](x, g, c_lo, c_hi, ctx.bits)
        return dx, dc_lo, dc_hi, None, None


def fake_quant(x, c_lo, c_hi, bits, impl=None):
    """Fake-quantize x to `bits` bits on the learned clip range [c_lo, c_hi] (differentiable).

    x: any shape, bf16/fp16/fp32; c_lo, c_hi: 0-dim fp32 tensors. Returns x_hat in x's dtype.
    impl: None (Triton on CUDA, torch otherwise), "triton" or "torch".
    """
    _check_args(x, c_lo, c_hi, bits)
    return _FakeQuant.apply(x, c_lo, c_hi, bits, resolve_impl(impl, x))
