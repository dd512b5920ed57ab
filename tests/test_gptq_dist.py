"""Calibration split over ranks and modules spread over ranks reproduce the one-rank GPTQ."""
import functools

import pytest
import torch
import torch.distributed as dist

from quant.solver import gptq_quantize
from quant.hessian import (HessianAccumulator, quantize_distributed, rank_windows,
                           reduce_hessian)
from tests.dist_utils import run_distributed

WINDOWS, TOKENS = 4, 16
MODULES = {"qkv": (24, 16), "out": (16, 16), "fc1": (32, 16), "fc2": (16, 32)}  # name: [out, in]


def calibration(integer: bool):
    """Per module: a weight and the activations of each calibration window [WINDOWS, TOKENS, in].

    Small-integer activations make every Hessian sum exact in fp32, so the distributed run must
    match bit for bit; Gaussian ones only to rounding.
    """
    g = torch.Generator().manual_seed(0)
    data = {}
    for name, (out, inp) in MODULES.items():
        x = torch.randint(-2, 3, (WINDOWS, TOKENS, inp), generator=g).float() if integer \
            else torch.randn(WINDOWS, TOKENS, inp, generator=g) * torch.linspace(0.1, 3, inp)
        data[name] = (torch.randn(out, inp, generator=g), x)
    return data


QUANTIZE = functools.partial(gptq_quantize, bits=4, group_size=8, act_order=True)


def first(quantize, W, H):
    return quantize(W, H)[0]


def accumulate(data, windows):
    accs = {}
    for name, (W, x) in data.items():
        accs[name] = HessianAccumulator(W.shape[1])
        accs[name].add(x[windows.start:windows.stop])  # this rank's windows, one batch
    return accs


def distributed_run(integer):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = calibration(integer)
    accs = accumulate(data, rank_windows(WINDOWS, rank, world))
    hessians = {name: reduce_hessian(acc) for name, acc in accs.items()}  # all-reduce variant
    weights = {name: W for name, (W, _) in data.items()}
    result = quantize_distributed(weights, accs, functools.partial(first, QUANTIZE))
    return hessians, result


def one_rank(integer):
    data = calibration(integer)
    hessians, result = {}, {}
    for name, (W, x) in data.items():
        acc = HessianAccumulator(W.shape[1])
        for half in (x[:WINDOWS // 2], x[WINDOWS // 2:]):
            acc.add(half)
        hessians[name] = acc.hessian
        result[name] = QUANTIZE(W, acc.hessian)[0]
    return hessians, result


@pytest.mark.parametrize("integer", [True, False])
def test_two_ranks_match_one_rank(integer):
    ref_h, ref_q = one_rank(integer)
    for hessians, result in run_distributed(distributed_run, 2, integer):
        for name in MODULES:
            torch.testing.assert_close(hessians[name], ref_h[name], rtol=1e-6, atol=1e-6)
            got, want = result[name], ref_q[name]
            assert (got.bits, got.group_size, got.sym, got.dim) == (4, 8, False, "oc")
            assert torch.equal(got.g_idx, want.g_idx)
            if integer:  # exact Hessians: the quantization must be identical
                assert torch.equal(got.codes, want.codes) and torch.equal(got.zeros, want.zeros)
                torch.testing.assert_close(got.scales, want.scales, rtol=1e-6, atol=0)
            else:  # rounding-level Hessian differences may move a rare code by one step
                assert (got.codes.int() - want.codes.int()).abs().le(1).all()
                assert (got.codes == want.codes).float().mean() > 0.97


def test_hessian_running_mean_matches_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g) * torch.linspace(0.5, 5, 12)
    acc = HessianAccumulator(12)
    for chunk in (x[:7], x[7:7], x[7:199].reshape(3, -1, 12), x[199:]):
        acc.add(chunk)
    x64 = x.double()
    torch.testing.assert_close(acc.hessian.double(), 2 / 300 * x64.T @ x64, rtol=1e-5, atol=1e-5)
    assert acc.count == 300
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(4, 11))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(torch.full((2, 12), float("nan")))


def test_rank_windows_partition():
    for world in (1, 2, 3, 8):
        shares = [rank_windows(10, r, world) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(10))
    with pytest.raises(ValueError):
        rank_windows(10, 2, 2)
