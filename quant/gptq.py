"""GPTQ for one linear layer, as a pure function of its weight and input Hessian (the solver
behind `python -m quant.quantize`, which runs it block by block over a model).

Follows Frantar et al. (2022): quantize columns one at a time and push each column's rounding
error onto the not yet quantized columns through the upper Cholesky factor of H^-1, in blocks of
columns whose updates to the rest of the matrix are applied lazily as one matmul per block.
Everything runs in float32 (float64 if the weight is float64) on the weight's device.
"""
import functools
import logging

import torch

from quant.grid import (DIMS, QuantizedWeight, check_bits, check_finite, dequantize_codes,
                        group_count, minmax_params, natural_g_idx, pack_result, quantize_codes)

log = logging.getLogger(__name__)
MAX_DAMP_TRIES = 8


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U (U^T U = (H + damp I)^-1), damp = percdamp * mean(diag H).

    A failed factorization (H singular or indefinite in floating point) is retried with ten
    times the dampening, so the caller always gets a finite factor or a clear error.
    """
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    mean_diag = hessian.diagonal().mean()
    frac = percdamp
    for _ in range(MAX_DAMP_TRIES):
        damped = hessian.clone()
        damped.diagonal().add_(frac * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        retry = max(10 * frac, 1e-3)
        log.warning("GPTQ: Cholesky failed at dampening %.3g * mean(diag H); retrying at %.3g",
                    frac, retry)
        frac = retry
    raise RuntimeError(f"GPTQ: Cholesky of the Hessian failed even at dampening {frac:.3g}")


def _check_inputs(weight, hessian, dim, static_groups, block_size):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if dim not in DIMS:
        raise ValueError(f"dim must be one of {DIMS}, got {dim!r}")
    if static_groups and dim == "ic":
        raise ValueError("static_groups applies to dim='oc'; per-IC groups are per column")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    check_finite("weight", weight)
    check_finite("hessian", hessian)
    if (hessian.diagonal() < 0).any():
        raise ValueError("hessian has a negative diagonal entry; it is not X^T X")


def _solve_block(W1, U1, s1, z1, bits: int, sym: bool, group_size: int, per_ic: bool):
    """GPTQ of the columns of one lazy block, in order; W1 [rows, width] takes the in-block updates.

    s1, z1: every column's grid [rows, width] when the grids were fitted up front, else None
    (fitted here: per group from the error-compensated columns, or per column with per_ic).
    Returns (codes, errors divided by U's diagonal, the grids fitted here or None): tensors whose
    shapes depend only on the block's, so that one CUDA graph serves every block of that shape.
    """
    rows, width = W1.shape
    codes1, err1 = torch.empty_like(W1), torch.empty_like(W1)
    scales1 = zeros1 = None
    if per_ic:
        scales1 = W1.new_empty(width, group_count(rows, group_size))
    elif s1 is None:  # dynamic groups; blocks start on a group boundary
        scales1 = W1.new_empty(rows, width // group_size)
    if scales1 is not None:
        zeros1 = torch.empty_like(scales1)
    for i in range(width):
        w = W1[:, i]
        if per_ic:
            s, z = minmax_params(w.reshape(scales1.shape[1], -1), bits, sym)
            scales1[i], zeros1[i] = s[:, 0], z[:, 0]
            s = s.expand(-1, rows // scales1.shape[1]).reshape(-1)
            z = z.expand(-1, rows // scales1.shape[1]).reshape(-1)
        elif s1 is None:
            if i % group_size == 0:
                s, z = minmax_params(W1[:, i:i + group_size], bits, sym)
                scales1[:, i // group_size], zeros1[:, i // group_size] = s[:, 0], z[:, 0]
                s, z = s[:, 0], z[:, 0]
        else:
            s, z = s1[:, i], z1[:, i]
        q = quantize_codes(w, s, z, bits, out=codes1[:, i])
        err = torch.div(w - dequantize_codes(q, s, z), U1[i, i], out=err1[:, i])
        W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1)
    return codes1, err1, scales1, zeros1


@functools.lru_cache(maxsize=16)
def _block_graph(device: torch.device, dtype: torch.dtype, rows: int, width: int, upfront: bool,
                 bits: int, sym: bool, group_size: int, per_ic: bool):
    """``_solve_block`` for one block shape captured in a CUDA graph: the eager loop is bound by
    a Python dispatch per kernel (nine per column); the replay launches the same kernels on
    the same shapes, so the same bits. The returned function copies its arguments into the
    graph's inputs and returns the graph's outputs, valid until its next call."""
    solve = functools.partial(_solve_block, bits=bits, sym=sym, group_size=group_size, per_ic=per_ic)
    new = functools.partial(torch.zeros, rows, width, device=device, dtype=dtype)
    inputs = (new(), torch.eye(width, device=device, dtype=dtype),
              *((new(), new()) if upfront else (None, None)))
    with torch.cuda.device(device), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graphs asks
            solve(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (NCCL's watchdog querying events) cannot end the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = solve(*inputs)

    def replay(*args):
        for static, arg in zip(inputs, args):
            if static is not None:
                static.copy_(arg)
        graph.replay()
        return outputs
    return replay


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4,
                  group_size: int = -1, sym: bool = False, act_order: bool = False,
                  static_groups: bool = False, dim: str = "oc", block_size: int = 128,
                  percdamp: float = 0.01, cuda_graph: bool = True) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ of a [out, in] weight given H = 2/N sum x x^T [in, in]; returns (codes, W_hat).

    act_order processes columns by descending diag H. With dim "oc" and group_size > 0, groups
    are dynamic (grid fitted when GPTQ reaches the group, from the error-compensated columns;
    with act_order the groups follow the processing order, recorded in g_idx) or static (grids
    fitted up front from the whole W, groups in natural order). The block size is rounded to a
    multiple of a dynamic group size so a group never straddles a lazy update. With dim "ic"
    (AdaDim) each column gets its own grid, groups running along the output dim, fitted just in
    time from the error-compensated column. ``cuda_graph``: on a CUDA weight, each block's
    per-column kernels replay from a CUDA graph (the same bits); False launches them one by one.
    """
    check_bits(bits)
    _check_inputs(weight, hessian, dim, static_groups, block_size)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.to(dtype).clone()
    H = hessian.to(device=W.device, dtype=dtype).clone()
    rows, cols = W.shape

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    per_ic = dim == "ic"
    n_groups = group_count(rows if per_ic else cols, group_size)
    upfront = not per_ic and (group_size == -1 or static_groups)
    dynamic = not per_ic and not upfront
    scales = W.new_empty(cols if per_ic else rows, n_groups)
    zeros = torch.empty_like(scales)
    if upfront:  # grids from the whole (dead-fixed) W, groups in natural column order
        s, z = minmax_params(W.reshape(rows, n_groups, cols // n_groups), bits, sym)
        scales, zeros = s.squeeze(-1), z.squeeze(-1)
    if dynamic:
        block_size = max(group_size, block_size // group_size * group_size)

    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(cols, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_cholesky(H, percdamp)
    col_group = natural_g_idx(cols, group_size, W.device)[perm] if upfront else None

    codes = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        grid = (scales[:, col_group[i1:i2]], zeros[:, col_group[i1:i2]]) if upfront else (None, None)
        solve = (_block_graph(W.device, dtype, rows, i2 - i1, upfront, bits, sym, group_size, per_ic)
                 if cuda_graph and W.is_cuda else
                 functools.partial(_solve_block, bits=bits, sym=sym, group_size=group_size, per_ic=per_ic))
        codes1, err1, scales1, zeros1 = solve(W[:, i1:i2], U[i1:i2, i1:i2], *grid)
        codes[:, i1:i2] = codes1
        if per_ic:
            scales[i1:i2], zeros[i1:i2] = scales1, zeros1
        elif dynamic:
            scales[:, i1 // group_size:i2 // group_size] = scales1
            zeros[:, i1 // group_size:i2 // group_size] = zeros1
        W[:, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1)

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    if per_ic:
        qw = pack_result(codes.T, scales[inv], zeros[inv],
                         natural_g_idx(rows, group_size, W.device), bits, group_size, sym, dim)
    else:
        g_idx = (torch.arange(cols, device=W.device) // group_size)[inv] if dynamic \
            else natural_g_idx(cols, group_size, W.device)
        qw = pack_result(codes, scales, zeros, g_idx, bits, group_size, sym, dim)
    return qw, qw.dequantize(dtype)


if __name__ == "__main__":      # this was the CLI's name until the layout of issue 17
    raise SystemExit("python -m quant.gptq: the quantization command is python -m quant.quantize "
                     "(quant.gptq is the algorithm)")
