"""token_kurtosis and KurtosisPenalty with channels (or, under sequence parallelism, tokens) split
over 2 real gloo ranks vs the single-process float64 result.

Inputs have mean 1e3 and std 1 (outlier-channel-like), where raw power sums break down in fp32.
"""
import functools

import torch
import torch.distributed as dist

from kernels import token_kurtosis
from kernels.kurtosis import token_kurtosis_grad, token_kurtosis_stats
from tests.dist_utils import run_distributed
from tests.test_kurtosis import _assert_grad_close, _grad64, kurtosis64

SPLITS = {"equal": (150, 150), "unequal": (137, 163)}
IMPLS = ("torch", "triton")
RTOL = 1e-5
G_SCALAR = 0.5


def _inputs():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(24, 300, generator=gen)
    y[:, ::37] *= 6.0  # heavy-tailed channels give a non-trivial m3 and kappa
    y = y + 1e3 + torch.randn(24, 1, generator=gen)
    return y, torch.randn(24, generator=gen)


def _tp_worker(y, g):
    """On each rank: kurtosis and gradient of this rank's channel slice, per split and impl."""
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    world_sum = functools.partial(dist.all_reduce, group=dist.group.WORLD)
    for name, splits in SPLITS.items():
        start = sum(splits[:rank])
        for impl in IMPLS:
            y_local = y[:, start:start + splits[rank]].clone().requires_grad_()
            kappa = token_kurtosis(y_local, all_reduce=world_sum, impl=impl)
            kappa.backward(g)  # the loss is replicated over ranks and counted once
            # the regularizer's entry points: a scalar dL/dkappa, added to an incoming gradient
            kappa_stats, stats = token_kurtosis_stats(y_local.detach(), all_reduce=world_sum, impl=impl)
            fused = token_kurtosis_grad(y_local.detach(), stats, G_SCALAR, grad_out=y_local.grad, impl=impl)
            out[name, impl] = (kappa.detach(), y_local.grad, kappa_stats, fused)
    return out


def _naive_raw_moment_kurtosis(y):
    """What all-reducing raw power sums would give: E[y^k] combined in fp32."""
    r1, r2, r3, r4 = (y.pow(k).mean(-1) for k in range(1, 5))
    m2 = r2 - r1 * r1
    m4 = r4 - 4 * r1 * r3 + 6 * r1 * r1 * r2 - 3 * r1 ** 4
    return m4 / (m2 * m2)


def test_tensor_parallel_kurtosis_matches_single_process_float64():
    y, g = _inputs()
    y64 = y.double().requires_grad_()
    kappa64 = kurtosis64(y64)
    kappa64.backward(g.double())

    # The test has teeth: the naive raw-moment formula misses the tolerance by orders of magnitude.
    naive_err = ((_naive_raw_moment_kurtosis(y).double() - kappa64) / kappa64).abs().max()
    assert naive_err > 100 * RTOL

    ranks = run_distributed(_tp_worker, 2, y, g)
    fused64 = y64.grad + _grad64(y, G_SCALAR, None)
    for (name, impl), (kappa0, _, kappa_stats0, _) in ranks[0].items():
        kappa1 = ranks[1][name, impl][0]
        assert torch.equal(kappa0, kappa1), (name, impl)
        torch.testing.assert_close(kappa0.double(), kappa64.detach(), rtol=RTOL, atol=0)
        grad = torch.cat([ranks[0][name, impl][1], ranks[1][name, impl][1]], dim=-1)
        _assert_grad_close(grad, y64.grad, rtol=RTOL)
        single = y.clone().requires_grad_()
        token_kurtosis(single, impl=impl).backward(g)
        _assert_grad_close(grad, single.grad.double(), rtol=RTOL)
        assert torch.equal(kappa_stats0, kappa0) and torch.equal(ranks[1][name, impl][2], kappa0)
        fused = torch.cat([ranks[0][name, impl][3], ranks[1][name, impl][3]], dim=-1)
        _assert_grad_close(fused, fused64, rtol=RTOL)


LAM, GRAD_SCALE = 0.3, 0.5


def _penalty_worker(y, g):
    """On each rank, per layout and reduce: the gradient KurtosisPenalty passes to this rank's part
    of y and the logged mean kurtosis. column: the channels are split (column-parallel output);
    sequence: the tokens are (row-parallel output under sequence parallelism)."""
    from megatron.core import parallel_state

    from qat.kurtosis import KurtosisConfig, KurtosisPenalty, set_grad_scale

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank, out = dist.get_rank(), {}
    set_grad_scale(GRAD_SCALE)
    for layout, dim in (("column", 1), ("sequence", 0)):
        part = y.shape[dim] // 2
        y_local, g_local = (t.narrow(dim, rank * part, part).clone() for t in (y, g))
        for reduce in ("mean", "sum"):
            penalty = KurtosisPenalty(KurtosisConfig(enabled=True, lambda_=LAM, reduce=reduce),
                                      split_channels=layout == "column", split_tokens=layout == "sequence")
            penalty.record_stats = True
            yr = y_local.clone().requires_grad_()
            penalty(yr).backward(g_local)
            out[layout, reduce] = (yr.grad, penalty.last_mean(), penalty.tokens)
    return out


def test_tensor_parallel_penalty_matches_single_process_float64():
    y, _ = _inputs()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) * 0.01  # ~ the penalty's part
    ranks = run_distributed(_penalty_worker, 2, y, g)
    mean64 = kurtosis64(y.double()).mean()
    for reduce in ("mean", "sum"):
        ref = _grad64(y, LAM * GRAD_SCALE / (24 if reduce == "mean" else 1), g)
        assert (ref - g.double()).abs().max() > 0.1 * ref.abs().max()
        for layout, dim in (("column", 1), ("sequence", 0)):
            grad = torch.cat([ranks[r][layout, reduce][0] for r in range(2)], dim=dim)
            _assert_grad_close(grad, ref, rtol=RTOL)
            for r in range(2):
                torch.testing.assert_close(ranks[r][layout, reduce][1].double(), mean64, rtol=RTOL, atol=0)
                assert ranks[r][layout, reduce][2] == 24
