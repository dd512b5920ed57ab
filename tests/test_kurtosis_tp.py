"""token_kurtosis with channels split over 2 real gloo ranks vs the single-process float64 result.

Inputs have mean 1e3 and std 1 (outlier-channel-like), where raw power sums break down in fp32.
"""
import torch
import torch.distributed as dist

from kernels import token_kurtosis
from tests.dist_utils import run_distributed
from tests.test_kernels import _assert_grad_close, kurtosis64

SPLITS = {"equal": (150, 150), "unequal": (137, 163)}
IMPLS = ("torch", "triton")
RTOL = 1e-5


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
    for name, splits in SPLITS.items():
        start = sum(splits[:rank])
        for impl in IMPLS:
            y_local = y[:, start:start + splits[rank]].clone().requires_grad_()
            kappa = token_kurtosis(y_local, group=dist.group.WORLD, impl=impl)
            kappa.backward(g)  # the loss is replicated over ranks and counted once
            out[name, impl] = (kappa.detach(), y_local.grad)
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
    for (name, impl), (kappa0, _) in ranks[0].items():
        kappa1 = ranks[1][name, impl][0]
        assert torch.equal(kappa0, kappa1), (name, impl)
        torch.testing.assert_close(kappa0.double(), kappa64.detach(), rtol=RTOL, atol=0)
        grad = torch.cat([ranks[0][name, impl][1], ranks[1][name, impl][1]], dim=-1)
        _assert_grad_close(grad, y64.grad, rtol=RTOL)
        single = y.clone().requires_grad_()
        token_kurtosis(single, impl=impl).backward(g)
        _assert_grad_close(grad, single.grad.double(), rtol=RTOL)
