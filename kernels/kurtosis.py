"""Per-token kurtosis of a layer output (DESIGN.md, "Kurtosis regularization").

For each token t over its N hidden channels, in fp32:
    mu = mean(y_t),  d = y_t - mu,  m_k = mean(d^k),  kappa = m4 / (m2^2 + eps)
Gradient (g = dL/dkappa, D = m2^2 + eps), from dm4/dy_i = 4/N (d_i^3 - m3) and dm2/dy_i = 2/N d_i:
    dy_i = g * 4 / (N D) * (d_i^3 - m3 - kappa * m2 * d_i)
Moments are taken around the mean (never as raw power sums), so tokens with |mu| >> sigma keep
their precision. Backward keeps y and four fp32 numbers per token: mu, m3, kappa*m2, 4/(N D).

With tensor parallelism each rank holds a contiguous slice of the channels. The forward then
all-reduces the per-token sums (and channel counts) to get the global mean, then all-reduces the
local sums of d^2, d^3, d^4 around it; kappa comes out identical on every rank, and the backward
is purely local: each rank's dy is exactly its slice of the single-process gradient.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .fake_quant import resolve_impl

# eps only has to keep constant rows finite (m2 = m4 = 0 gives kappa = 0, dy = 0). It is far below
# m2^2 of any activation worth regularizing (std 1e-5 gives m2^2 = 1e-20), so kappa stays
# scale-invariant in practice; and it sits well above the fp32 underflow of m2^2 (~1e-38).
KURTOSIS_EPS = 1e-20
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(y, eps):
    if not isinstance(y, torch.Tensor) or y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"token_kurtosis: y must be a bf16/fp16/fp32 tensor, got "
                        f"{getattr(y, 'dtype', type(y))}")
    if y.dim() == 0 or y.shape[-1] == 0:
        raise ValueError(f"token_kurtosis: y needs a non-empty last (channel) dim, got shape "
                         f"{tuple(y.shape)}")
    if not eps > 0:
        raise ValueError(f"token_kurtosis: eps must be > 0 so constant rows stay finite, got {eps}")


def _finish(mu, m2, m3, m4, n, eps):
    """kappa and the per-token stats the backward needs, from the global moments."""
    denom = m2 * m2 + eps
    kappa = m4 / denom
    return kappa, torch.stack([mu, m3, kappa * m2, 4.0 / (n * denom)], dim=-1)


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def _central_sums_torch(y2d, mu):
    """Per-row sums of d^2, d^3, d^4 with d = y - mu, as a (T, 3) fp32 tensor."""
    d = y2d.float() - mu[:, None]
    d2 = d * d
    return torch.stack([d2.sum(-1), (d2 * d).sum(-1), (d2 * d2).sum(-1)], dim=-1)


def _moments_torch(y2d, eps):
    n = y2d.shape[-1]
    mu = y2d.float().mean(-1)
    m2, m3, m4 = (_central_sums_torch(y2d, mu) / n).unbind(-1)
    return _finish(mu, m2, m3, m4, n, eps)


def _grad_torch(y2d, stats, g):
    mu, m3, kappa_m2, coef = stats.unbind(-1)
    d = y2d.float() - mu[:, None]
    dy = (g * coef)[:, None] * (d * d * d - m3[:, None] - kappa_m2[:, None] * d)
    return dy.to(y2d.dtype)


# ---------------------------------------------------------------------------------------------
# Triton: one program per token, holding the whole row
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moments_kernel(y_ptr, mu_ptr, sums_ptr, kappa_ptr, stats_ptr, n_cols, eps,
                    MU_GIVEN: tl.constexpr, BLOCK_N: tl.constexpr):
    """One pass over a row. MU_GIVEN (tensor parallel): write the local sums of d^2, d^3, d^4
    around the given global mean. Otherwise: the row is the whole token; write kappa and stats."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if MU_GIVEN:
        mu = tl.load(mu_ptr + row)
    else:
        mu = tl.sum(y, axis=0) / n_cols
    d = tl.where(mask, y - mu, 0.0)
    d2 = d * d
    s2 = tl.sum(d2, axis=0)
    s3 = tl.sum(d2 * d, axis=0)
    s4 = tl.sum(d2 * d2, axis=0)
    if MU_GIVEN:
        tl.store(sums_ptr + 3 * row, s2)
        tl.store(sums_ptr + 3 * row + 1, s3)
        tl.store(sums_ptr + 3 * row + 2, s4)
    else:  # _finish, fused
        m2 = s2 / n_cols
        denom = m2 * m2 + eps
        kappa = (s4 / n_cols) / denom
        tl.store(kappa_ptr + row, kappa)
        tl.store(stats_ptr + 4 * row, mu)
        tl.store(stats_ptr + 4 * row + 1, s3 / n_cols)
        tl.store(stats_ptr + 4 * row + 2, kappa * m2)
        tl.store(stats_ptr + 4 * row + 3, 4.0 / (n_cols * denom))


@triton.jit
def _grad_kernel(y_ptr, stats_ptr, g_ptr, dy_ptr, n_cols, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(stats_ptr + 4 * row)
    m3 = tl.load(stats_ptr + 4 * row + 1)
    kappa_m2 = tl.load(stats_ptr + 4 * row + 2)
    scale = tl.load(g_ptr + row) * tl.load(stats_ptr + 4 * row + 3)
    d = y - mu
    dy = scale * (d * d * d - m3 - kappa_m2 * d)
    tl.store(dy_ptr + row * n_cols + cols, dy.to(dy_ptr.dtype.element_ty), mask=mask)


def _row_launch(n_cols):
    """Grid-independent launch settings for a whole-row program: block width and warps."""
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK_N=block, num_warps=min(16, max(4, block // 512)))


def _moments_triton(y2d, eps):
    rows, n = y2d.shape
    kappa = torch.empty(rows, dtype=torch.float32, device=y2d.device)
    stats = torch.empty(rows, 4, dtype=torch.float32, device=y2d.device)
    _moments_kernel[(rows,)](y2d, kappa, kappa, kappa, stats, n, eps, MU_GIVEN=False,
                             **_row_launch(n))
    return kappa, stats


def _central_sums_triton(y2d, mu):
    rows, n = y2d.shape
    sums = torch.empty(rows, 3, dtype=torch.float32, device=y2d.device)
    _moments_kernel[(rows,)](y2d, mu, sums, sums, sums, n, 0.0, MU_GIVEN=True, **_row_launch(n))
    return sums


def _grad_triton(y2d, stats, g):
    rows, n = y2d.shape
    dy = torch.empty_like(y2d)
    _grad_kernel[(rows,)](y2d, stats, g, dy, n, **_row_launch(n))
    return dy


_MOMENTS = {"torch": _moments_torch, "triton": _moments_triton}
_CENTRAL_SUMS = {"torch": _central_sums_torch, "triton": _central_sums_triton}
_GRAD = {"torch": _grad_torch, "triton": _grad_triton}


def _moments_tensor_parallel(y2d, eps, group, impl):
    """kappa and stats of tokens whose channels are split over `group` (two all-reduces)."""
    sums = torch.cat([y2d.sum(-1, dtype=torch.float32),
                      torch.tensor([y2d.shape[-1]], dtype=torch.float32, device=y2d.device)])
    dist.all_reduce(sums, group=group)
    n = sums[-1]
    mu = sums[:-1] / n
    central = _CENTRAL_SUMS[impl](y2d, mu)
    dist.all_reduce(central, group=group)
    m2, m3, m4 = (central / n).unbind(-1)
    return _finish(mu, m2, m3, m4, n, eps)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

class _TokenKurtosis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, eps, group, impl):
        y2d = y.reshape(-1, y.shape[-1]).contiguous()
        if group is not None and dist.get_world_size(group) > 1:
            kappa, stats = _moments_tensor_parallel(y2d, eps, group, impl)
        else:
            kappa, stats = _MOMENTS[impl](y2d, eps)
        ctx.save_for_backward(y2d, stats)
        ctx.impl, ctx.y_shape = impl, y.shape
        return kappa.view(y.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        y2d, stats = ctx.saved_tensors
        dy = _GRAD[ctx.impl](y2d, stats, g.reshape(-1).float().contiguous())
        return dy.view(ctx.y_shape), None, None, None


def token_kurtosis(y, eps=KURTOSIS_EPS, group=None, impl=None):
    """Kurtosis of every token over the last (channel) dim: fp32, shape y.shape[:-1].

    group: the tensor-parallel process group when y holds a slice of the channels; kappa is then
    the kurtosis over all channels, identical on every rank. impl: None, "triton" or "torch".
    """
    _check_args(y, eps)
    return _TokenKurtosis.apply(y, float(eps), group, resolve_impl(impl, y))
