"""Per-token kurtosis of a layer output (DESIGN.md, "Kurtosis regularization").

For each token t over its N hidden channels, in fp32:
    mu = mean(y_t),  d = y_t - mu,  m_k = mean(d^k),  kappa = m4 / (m2^2 + eps)
Gradient (g = dL/dkappa, D = m2^2 + eps), from dm4/dy_i = 4/N (d_i^3 - m3) and dm2/dy_i = 2/N d_i:
    dy_i = g * 4 / (N D) * (d_i^3 - m3 - kappa * m2 * d_i)

Precision: outlier channels have |mu| >> sigma, where raw power sums lose everything. The moments
are taken around a pivot p (the fp32 mean, itself off by ~ulp(mu), which can be a sizeable
fraction of sigma): y - p is exact, the sums of (y - p)^k, k = 1..4, are well conditioned, and the
exact shift to the true mean, e = mean(y - p), is applied to the moments algebraically. Backward
forms d = (y - p) - e the same way and keeps y plus five fp32 numbers per token:
p, e, m3, kappa*m2, 4/(N D).

With tensor parallelism each rank holds a contiguous slice of the channels. The forward
all-reduces (through the caller's `all_reduce`: this module stays free of torch.distributed) the
per-token sums (and channel counts) to get a common pivot, then all-reduces the
local sums of (y - p)^k; kappa comes out identical on every rank, and the backward is purely
local: each rank's dy is exactly its slice of the single-process gradient.

Two entry points serve a regularizer that needs no autograd graph of its own:
token_kurtosis_stats (kappa and the backward stats) and token_kurtosis_grad (the gradient,
added to the one arriving from downstream in the same pass: one read of y and of grad_out, one
write). token_kurtosis is the differentiable composition of the two. When the forward needs no
kappa (no logging) and the channels are whole, token_kurtosis_grad takes no stats and forms them
from the row it holds anyway, so the forward runs no kernel at all.
"""
import torch
import triton
import triton.language as tl

from .fake_quant import _FLOAT_DTYPES, resolve_impl

# eps keeps constant rows finite: their m2 and m4 are 0 (exactly when the fp32 mean is exact, as for
# zero rows; at rounding level otherwise), so kappa = m4 / eps is ~0 instead of 0/0. It is far below
# m2^2 of any activation worth regularizing (std 1e-5 gives m2^2 = 1e-20), so kappa stays
# scale-invariant in practice, and far above the fp32 underflow of m2^2 (~1e-38).
KURTOSIS_EPS = 1e-20


def _check_args(y, eps):
    if not isinstance(y, torch.Tensor) or y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"token_kurtosis: y must be a bf16/fp16/fp32 tensor, got "
                        f"{getattr(y, 'dtype', type(y))}")
    if y.dim() == 0 or y.shape[-1] == 0:
        raise ValueError(f"token_kurtosis: y needs a non-empty last (channel) dim, got shape "
                         f"{tuple(y.shape)}")
    if not eps > 0:
        raise ValueError(f"token_kurtosis: eps must be > 0 so constant rows stay finite, got {eps}")


def _finish(pivot, sums, n, eps):
    """kappa and the per-token backward stats, from the sums of (y - pivot)^k, k = 1..4."""
    e, p2, p3, p4 = (sums / n).unbind(-1)  # moments around the pivot
    m2 = p2 - e * e
    m3 = p3 - e * (3.0 * p2 - 2.0 * e * e)
    m4 = p4 - e * (4.0 * p3 - e * (6.0 * p2 - 3.0 * e * e))
    denom = m2 * m2 + eps
    kappa = m4 / denom
    return kappa, torch.stack([pivot, e, m3, kappa * m2, 4.0 / (n * denom)], dim=-1)


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def _pivot_sums_torch(y2d, pivot):
    """Per-row sums of d, d^2, d^3, d^4 with d = y - pivot, as a (T, 4) fp32 tensor."""
    d = y2d.float() - pivot[:, None]
    d2 = d * d
    return torch.stack([d.sum(-1), d2.sum(-1), (d2 * d).sum(-1), (d2 * d2).sum(-1)], dim=-1)


def _moments_torch(y2d, eps):
    pivot = y2d.float().mean(-1)
    return _finish(pivot, _pivot_sums_torch(y2d, pivot), y2d.shape[-1], eps)


def _grad_torch(y2d, stats, g, grad_out=None, eps=KURTOSIS_EPS):
    """g: per-token (T,) fp32 tensor or a float; grad_out: (T, N) or None; stats None: from y2d."""
    if stats is None:
        stats = _moments_torch(y2d, eps)[1]
    pivot, e, m3, kappa_m2, coef = (s[:, None] for s in stats.unbind(-1))
    if isinstance(g, torch.Tensor):
        g = g[:, None]
    d = (y2d.float() - pivot) - e
    dy = (g * coef) * (d * d * d - m3 - kappa_m2 * d)
    if grad_out is not None:
        dy = dy + grad_out.float()
    return dy.to(y2d.dtype)


# ---------------------------------------------------------------------------------------------
# Triton: one program per token, holding the whole row
# ---------------------------------------------------------------------------------------------

@triton.jit
def _pivot_sums(y, mask, pivot):
    """The row's sums of (y - pivot)^k, k = 1..4."""
    d = tl.where(mask, y - pivot, 0.0)
    d2 = d * d
    return tl.sum(d, axis=0), tl.sum(d2, axis=0), tl.sum(d2 * d, axis=0), tl.sum(d2 * d2, axis=0)


@triton.jit
def _row_stats(y, mask, n_cols, eps):
    """_finish for one whole token held in registers: (pivot, e, m3, kappa, m2, 4 / (N D))."""
    pivot = tl.sum(y, axis=0) / n_cols
    s1, s2, s3, s4 = _pivot_sums(y, mask, pivot)
    e = s1 / n_cols
    p2 = s2 / n_cols
    p3 = s3 / n_cols
    m2 = p2 - e * e
    m3 = p3 - e * (3.0 * p2 - 2.0 * e * e)
    m4 = s4 / n_cols - e * (4.0 * p3 - e * (6.0 * p2 - 3.0 * e * e))
    denom = m2 * m2 + eps
    kappa = m4 / denom
    return pivot, e, m3, kappa, m2, 4.0 / (n_cols * denom)


@triton.jit
def _moments_kernel(y_ptr, pivot_ptr, sums_ptr, kappa_ptr, stats_ptr, n_cols, eps,
                    PIVOT_GIVEN: tl.constexpr, BLOCK_N: tl.constexpr):
    """One pass over a row. PIVOT_GIVEN (tensor parallel): write the local sums of (y - p)^k
    around the common pivot. Otherwise the row is the whole token: write kappa and stats."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if PIVOT_GIVEN:
        s1, s2, s3, s4 = _pivot_sums(y, mask, tl.load(pivot_ptr + row))
        tl.store(sums_ptr + 4 * row, s1)
        tl.store(sums_ptr + 4 * row + 1, s2)
        tl.store(sums_ptr + 4 * row + 2, s3)
        tl.store(sums_ptr + 4 * row + 3, s4)
    else:
        pivot, e, m3, kappa, m2, coef = _row_stats(y, mask, n_cols, eps)
        tl.store(kappa_ptr + row, kappa)
        tl.store(stats_ptr + 5 * row, pivot)
        tl.store(stats_ptr + 5 * row + 1, e)
        tl.store(stats_ptr + 5 * row + 2, m3)
        tl.store(stats_ptr + 5 * row + 3, kappa * m2)
        tl.store(stats_ptr + 5 * row + 4, coef)


@triton.jit
def _grad_kernel(y_ptr, stats_ptr, g_ptr, g_scalar, gout_ptr, gout_stride, dy_ptr, n_cols, eps,
                 G_PER_TOKEN: tl.constexpr, ADD_GRAD_OUT: tl.constexpr, STATS_GIVEN: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """dy = g * coef * (d^3 - m3 - kappa*m2 * d) [+ grad_out]: g per token (G_PER_TOKEN) or the
    same g_scalar for every token; adding grad_out here saves autograd a separate read-read-write.
    Without STATS_GIVEN the row's stats come from the row itself, already in registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if STATS_GIVEN:
        pivot = tl.load(stats_ptr + 5 * row)
        e = tl.load(stats_ptr + 5 * row + 1)
        m3 = tl.load(stats_ptr + 5 * row + 2)
        kappa_m2 = tl.load(stats_ptr + 5 * row + 3)
        coef = tl.load(stats_ptr + 5 * row + 4)
    else:
        pivot, e, m3, kappa, m2, coef = _row_stats(y, mask, n_cols, eps)
        kappa_m2 = kappa * m2
    if G_PER_TOKEN:
        scale = tl.load(g_ptr + row) * coef
    else:
        scale = g_scalar * coef
    d = (y - pivot) - e
    dy = scale * (d * d * d - m3 - kappa_m2 * d)
    if ADD_GRAD_OUT:
        dy += tl.load(gout_ptr + row * gout_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dy_ptr + row * n_cols + cols, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# Launch settings, measured on H200 (16384 tokens, bf16): one row per program. Several rows per
# program as [rows, BLOCK_N] tiles were slower for both kernels at 2048 and 8192 channels. With these
# settings the moments kernel reads at 0.71 (2048) and 0.83 (8192) of a device copy's bandwidth,
# the gradient kernel with the add moves its bytes at about 1.05 and 1.02.
_MOMENTS_ELEMS_PER_WARP = 2048  # 64 per thread: more warps per row stall the loads on row reductions


def _moments_launch(n_cols, num_warps=None):
    """Moments launch settings from the row width alone: few warps per row (about
    _MOMENTS_ELEMS_PER_WARP channels each; at 2048, 2 warps were 7 % slower, 4 warps 20 %).
    The override exists for bench/kernel_sweep.py."""
    block = triton.next_power_of_2(n_cols)
    if num_warps is None:
        num_warps = min(16, max(1, block // _MOMENTS_ELEMS_PER_WARP))
    return dict(BLOCK_N=block, num_warps=num_warps)


def _grad_launch(n_cols):
    """Gradient launch settings: 8 warps were best at 2048 and 8192 channels (4 as good at 2048,
    16 at 8192); 4 for narrow rows, 16 beyond 16384 channels (over 64 elements per thread)."""
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK_N=block, num_warps=4 if block < 2048 else 8 if block <= 16384 else 16)


def _moments_triton(y2d, eps, **launch):
    rows, n = y2d.shape
    kappa = torch.empty(rows, dtype=torch.float32, device=y2d.device)
    stats = torch.empty(rows, 5, dtype=torch.float32, device=y2d.device)
    _moments_kernel[(rows,)](y2d, kappa, kappa, kappa, stats, n, eps, PIVOT_GIVEN=False,
                             **_moments_launch(n, **launch))
    return kappa, stats


def _pivot_sums_triton(y2d, pivot):
    rows, n = y2d.shape
    sums = torch.empty(rows, 4, dtype=torch.float32, device=y2d.device)
    _moments_kernel[(rows,)](y2d, pivot, sums, sums, sums, n, 0.0, PIVOT_GIVEN=True,
                             **_moments_launch(n))
    return sums


def _grad_triton(y2d, stats, g, grad_out=None, eps=KURTOSIS_EPS):
    """g: per-token (T,) fp32 tensor or a float; grad_out: None or (T, N) with unit column stride;
    stats None: from y2d, in the same pass."""
    rows, n = y2d.shape
    dy = torch.empty_like(y2d)
    per_token, add, given = isinstance(g, torch.Tensor), grad_out is not None, stats is not None
    _grad_kernel[(rows,)](y2d, stats if given else y2d, g if per_token else y2d, 0.0 if per_token else g,
                          grad_out if add else y2d, grad_out.stride(0) if add else 0, dy, n, eps,
                          G_PER_TOKEN=per_token, ADD_GRAD_OUT=add, STATS_GIVEN=given, **_grad_launch(n))
    return dy


_MOMENTS = {"torch": _moments_torch, "triton": _moments_triton}
_PIVOT_SUMS = {"torch": _pivot_sums_torch, "triton": _pivot_sums_triton}
_GRAD = {"torch": _grad_torch, "triton": _grad_triton}


def _moments_tensor_parallel(y2d, eps, all_reduce, impl):
    """kappa and stats of tokens whose channels are split over ranks (two calls of all_reduce)."""
    sums = torch.cat([y2d.sum(-1, dtype=torch.float32),
                      torch.tensor([y2d.shape[-1]], dtype=torch.float32, device=y2d.device)])
    all_reduce(sums)
    n = sums[-1]
    pivot = sums[:-1] / n
    pivot_sums = _PIVOT_SUMS[impl](y2d, pivot)
    all_reduce(pivot_sums)
    return _finish(pivot, pivot_sums, n, eps)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("qat_kernels::token_kurtosis_stats", mutates_args=())
def _moments_op(y2d: torch.Tensor, eps: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What torch.compile sees of the (single-rank) moments: (kappa, stats)."""
    return _MOMENTS[impl](y2d, eps)


@_moments_op.register_fake
def _(y2d, eps, impl):
    return y2d.new_empty(y2d.shape[0], dtype=torch.float32), y2d.new_empty(y2d.shape[0], 5, dtype=torch.float32)


@torch.library.custom_op("qat_kernels::token_kurtosis_grad", mutates_args=())
def _grad_op(y2d: torch.Tensor, stats: torch.Tensor | None, g: float, grad_out: torch.Tensor | None,
             impl: str, eps: float) -> torch.Tensor:
    """What torch.compile sees of the gradient kernel (the same dL/dkappa g for every token)."""
    return _GRAD[impl](y2d, stats, g, grad_out, eps)


@_grad_op.register_fake
def _(y2d, stats, g, grad_out, impl, eps):
    return torch.empty_like(y2d)


def _stats(y, eps, all_reduce, impl):
    y2d = y.reshape(-1, y.shape[-1]).contiguous()
    if all_reduce is not None:
        kappa, stats = _moments_tensor_parallel(y2d, eps, all_reduce, impl)
    elif torch.compiler.is_compiling():
        kappa, stats = _moments_op(y2d, eps, impl)
    else:
        kappa, stats = _MOMENTS[impl](y2d, eps)
    return kappa.view(y.shape[:-1]), stats


def _grad(y, stats, g_kappa, grad_out, impl, eps=KURTOSIS_EPS):
    n = y.shape[-1]
    if isinstance(g_kappa, torch.Tensor):
        g_kappa = g_kappa.reshape(-1).float().contiguous()
    if grad_out is not None:
        grad_out = grad_out.reshape(-1, n)  # a view where the strides allow it
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
    y2d = y.reshape(-1, n).contiguous()
    if torch.compiler.is_compiling() and not isinstance(g_kappa, torch.Tensor):
        dy = _grad_op(y2d, stats, g_kappa, grad_out, impl, eps)
    else:
        dy = _GRAD[impl](y2d, stats, g_kappa, grad_out, eps)
    return dy.view(y.shape)


class _TokenKurtosis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, eps, all_reduce, impl):
        kappa, stats = _stats(y, eps, all_reduce, impl)
        ctx.save_for_backward(y, stats)
        ctx.impl = impl
        return kappa

    @staticmethod
    def backward(ctx, g):
        y, stats = ctx.saved_tensors
        return _grad(y, stats, g, None, ctx.impl), None, None, None


def token_kurtosis(y, eps=KURTOSIS_EPS, all_reduce=None, impl=None):
    """Kurtosis of every token over the last (channel) dim: fp32, shape y.shape[:-1].

    all_reduce: when y holds a slice of the channels (tensor parallelism over more than one rank), a
    function summing a tensor in place over the ranks of the slices, e.g.
    functools.partial(dist.all_reduce, group=tp_group); kappa is then the kurtosis over all
    channels, identical on every rank. None for whole channels. impl: None, "triton" or "torch".
    """
    _check_args(y, eps)
    return _TokenKurtosis.apply(y, float(eps), all_reduce, resolve_impl(impl, y))


@torch.no_grad()
def token_kurtosis_stats(y, eps=KURTOSIS_EPS, all_reduce=None, impl=None):
    """(kappa, stats) without autograd: kappa as token_kurtosis returns it, stats the (tokens, 5)
    fp32 per-token numbers token_kurtosis_grad needs besides y."""
    _check_args(y, eps)
    return _stats(y, float(eps), all_reduce, resolve_impl(impl, y))


@torch.no_grad()
def token_kurtosis_grad(y, stats, g_kappa, grad_out=None, impl=None, eps=KURTOSIS_EPS):
    """d(sum_t g_kappa_t * kappa_t)/dy + grad_out, in one pass, as a tensor like y (fp32 math).

    stats: from token_kurtosis_stats(y), or None to compute them from y in the same pass (whole
    tokens only: with channels split over ranks they need token_kurtosis_stats' all-reduces).
    g_kappa: a float (the same dL/dkappa for every token) or a tensor of shape y.shape[:-1].
    grad_out: None or a tensor of y's shape, any strides. eps: as token_kurtosis_stats' (with stats None).
    """
    _check_args(y, eps)
    tokens = y.numel() // y.shape[-1]
    if stats is not None and (stats.shape != (tokens, 5) or stats.dtype != torch.float32):
        raise ValueError(f"token_kurtosis_grad: stats must be fp32 of shape ({tokens}, 5), got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    if isinstance(g_kappa, torch.Tensor) and g_kappa.shape != y.shape[:-1]:
        raise ValueError(f"token_kurtosis_grad: g_kappa must be a float or of shape "
                         f"{tuple(y.shape[:-1])}, got {tuple(g_kappa.shape)}")
    if grad_out is not None and grad_out.shape != y.shape:
        raise ValueError(f"token_kurtosis_grad: grad_out must have y's shape {tuple(y.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    if not isinstance(g_kappa, torch.Tensor):
        g_kappa = float(g_kappa)
    return _grad(y, stats, g_kappa, grad_out, resolve_impl(impl, y), float(eps))
