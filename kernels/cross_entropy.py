"""Cross entropy of (vocabulary-parallel) logits, two passes over the logits in their own dtype
(DESIGN.md, "The loss").

For token t with logits x_t over the vocabulary and target c_t, in fp32 whatever the logits' dtype:
    loss_t = lse_t - x_t[c_t],   lse_t = log sum_j exp(x_tj)
    dloss/dx_tj = g_t * (exp(x_tj - lse_t) - [j = c_t])
The forward reads the logits once (a running max and sum of exponentials per row) and keeps them
with one fp32 lse per token; the backward reads them once more and writes the gradient over them
(the logits are dead once their gradient exists). megatron-core's vocab_parallel_cross_entropy on
logits.float() makes an fp32 copy, passes over it five times and keeps an fp32 softmax: about 8x
the bytes, and twice the logits' size held from forward to backward (2 GiB at 16k tokens x 32k
vocabulary).

With tensor parallelism each of R ranks holds the contiguous vocabulary slice
[rank * V/R, (rank + 1) * V/R). Each computes the lse of its slice, and the target logit where the
target falls in its slice (0 elsewhere); one sum over the ranks (the caller's `all_reduce`: this
module stays free of torch.distributed) of an (R + 1, T) tensor, where each rank fills its own row
and the last, gathers both exactly; every rank then takes the same logsumexp over the R partial
lses, so the loss is identical everywhere and the backward is purely local.

The loss runs outside the compiled blocks (train.compile), so these kernels are not custom ops.
"""
import torch
import triton
import triton.language as tl

from .fake_quant import _FLOAT_DTYPES, resolve_impl

_BLOCK = 4096   # vocabulary columns per loop iteration; one program per token


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def _local_targets(labels, vocab_start, n):
    """(column of the target in this slice, clamped to it; whether the target is in the slice)."""
    local = labels - vocab_start
    in_slice = (local >= 0) & (local < n)
    return local.clamp(0, n - 1), in_slice


def _forward_torch(x2d, labels, vocab_start):
    x = x2d.float()
    col, in_slice = _local_targets(labels, vocab_start, x.shape[-1])
    target = torch.where(in_slice, x.gather(1, col[:, None])[:, 0], 0.0)
    return torch.logsumexp(x, dim=-1), target


def _backward_torch(x2d, labels, lse, g, vocab_start):
    """Writes the gradient over x2d."""
    p = torch.exp(x2d.float() - lse[:, None])
    col, in_slice = _local_targets(labels, vocab_start, x2d.shape[-1])
    p.scatter_add_(1, col[:, None], -in_slice.float()[:, None])
    x2d.copy_(p * g[:, None])


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(x_ptr, labels_ptr, lse_ptr, target_ptr, n_cols, vocab_start,
                    BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for i in range(BLOCKS):
        cols = i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(s))
    col = tl.load(labels_ptr + row) - vocab_start
    in_slice = (col >= 0) & (col < n_cols)
    target = tl.load(x_row + col, mask=in_slice, other=0.0).to(tl.float32)
    tl.store(target_ptr + row, tl.where(in_slice, target, 0.0))


@triton.jit
def _backward_kernel(x_ptr, labels_ptr, lse_ptr, g_ptr, n_cols, vocab_start, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """x = g * (exp(x - lse) - onehot(target)), in place, row by row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    col = tl.load(labels_ptr + row) - vocab_start
    for i in range(BLOCKS):
        cols = i * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dx = g * (tl.exp(x - lse) - tl.where(cols == col, 1.0, 0.0))
        tl.store(x_row + cols, dx.to(x_ptr.dtype.element_ty), mask=mask)


def _launch(n_cols):
    """BLOCKS (the loop's trip count) is a constant: the interpreter cannot loop to a runtime bound,
    and a model has one vocabulary size."""
    block = min(_BLOCK, triton.next_power_of_2(n_cols))
    return dict(BLOCK=block, BLOCKS=triton.cdiv(n_cols, block), num_warps=4 if block <= 1024 else 8)


def _forward_triton(x2d, labels, vocab_start):
    rows, n = x2d.shape
    lse = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    target = torch.empty_like(lse)
    _forward_kernel[(rows,)](x2d, labels, lse, target, n, vocab_start, **_launch(n))
    return lse, target


def _backward_triton(x2d, labels, lse, g, vocab_start):
    rows, n = x2d.shape
    _backward_kernel[(rows,)](x2d, labels, lse, g, n, vocab_start, **_launch(n))


_FORWARD = {"torch": _forward_torch, "triton": _forward_triton}
_BACKWARD = {"torch": _backward_torch, "triton": _backward_triton}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, rank, ranks, all_reduce, impl):
        n = logits.shape[-1]
        x2d = logits.reshape(-1, n).contiguous()
        labels1d = labels.reshape(-1).contiguous()
        lse, target = _FORWARD[impl](x2d, labels1d, rank * n)
        if all_reduce is not None:
            parts = lse.new_zeros(ranks + 1, lse.numel())
            parts[rank], parts[ranks] = lse, target
            all_reduce(parts)
            lse, target = torch.logsumexp(parts[:ranks], dim=0), parts[ranks]
        ctx.save_for_backward(x2d, labels1d, lse)
        ctx.vocab_start, ctx.impl, ctx.shape = rank * n, impl, logits.shape
        return (lse - target).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.impl is None:
            raise RuntimeError("cross_entropy: backward ran twice (retain_graph); the first one "
                               "wrote the gradient over the saved logits")
        x2d, labels1d, lse = ctx.saved_tensors
        g = grad_loss.reshape(-1).float().contiguous()
        _BACKWARD[ctx.impl](x2d, labels1d, lse, g, ctx.vocab_start)
        ctx.impl = None
        return x2d.view(ctx.shape), None, None, None, None, None


def cross_entropy(logits, labels, rank=0, ranks=1, all_reduce=None, impl=None):
    """Per-token cross entropy (fp32, labels' shape) of logits [..., V/ranks] against labels [...].

    With the vocabulary split over `ranks` > 1 ranks, this rank holds columns
    [rank * V/ranks, (rank + 1) * V/ranks) and `all_reduce` sums a tensor in place over the ranks,
    e.g. functools.partial(dist.all_reduce, group=tp_group). Labels out of [0, V) are not checked
    (a check would synchronize the host); they give a loss without a target logit.
    The backward writes the logits' gradient over the logits, so they must not be used after it.
    impl: None, "triton" or "torch".
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"cross_entropy: logits must be a bf16/fp16/fp32 tensor, got "
                        f"{getattr(logits, 'dtype', type(logits))}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cross_entropy: labels must be an int32/int64 tensor, got "
                        f"{getattr(labels, 'dtype', type(labels))}")
    if logits.dim() == 0 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: labels must have the logits' shape without its last dim, got "
                         f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if not 0 <= rank < ranks or (ranks > 1) != (all_reduce is not None):
        raise ValueError(f"cross_entropy: need 0 <= rank < ranks and an all_reduce exactly when ranks > 1, "
                         f"got rank {rank}, ranks {ranks}, all_reduce {all_reduce}")
    return _CrossEntropy.apply(logits, labels, rank, ranks, all_reduce, resolve_impl(impl, logits))
