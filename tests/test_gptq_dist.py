"""Calibration split over ranks and modules spread over ranks reproduce the one-rank GPTQ bit for bit."""
import functools

import pytest
import torch
import torch.distributed as dist

from quant.gptq import gptq_quantize
from quant.hessian import (HessianAccumulator, quantize_distributed, rank_windows,
                           reduce_hessian)
from tests.dist_utils import run_distributed

TOKENS = 16
MODULES = {"qkv": (24, 16), "out": (16, 16), "fc1": (32, 16), "fc2": (16, 32)}  # name: [out, in]


def calibration(integer: bool, windows: int):
    """Per module: a weight and the activations of each calibration window [windows, TOKENS, in].

    Small-integer activations make every Hessian sum exact in fp32; Gaussian ones do not, so
    only the same float operations in the same order give the same bits.
    """
    g = torch.Generator().manual_seed(0)
    data = {}
    for name, (out, inp) in MODULES.items():
        x = torch.randint(-2, 3, (windows, TOKENS, inp), generator=g).float() if integer \
            else torch.randn(windows, TOKENS, inp, generator=g) * torch.linspace(0.1, 3, inp)
        data[name] = (torch.randn(out, inp, generator=g), x)
    return data


QUANTIZE = functools.partial(gptq_quantize, bits=4, group_size=8, act_order=True)


def first(quantize, W, H):
    return quantize(W, H)[0]


def accumulate(data, windows: range, batch_size: int, keep_batches: bool):
    """One accumulator per module fed ``windows`` in forward batches of ``batch_size`` windows."""
    accs = {}
    for name, (W, x) in data.items():
        accs[name] = HessianAccumulator(W.shape[1], keep_batches=keep_batches)
        for start in range(windows.start, windows.stop, batch_size):
            accs[name].add(x[start:min(start + batch_size, windows.stop)])
    return accs


def distributed_run(integer, windows, batch_size):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = calibration(integer, windows)
    accs = accumulate(data, rank_windows(windows, batch_size, rank, world), batch_size, rank > 0)
    hessians = {name: reduce_hessian(acc) for name, acc in accs.items()}  # all-reduce variant
    owner_h = [reduce_hessian(accs["fc2"], dst) for dst in range(world)]  # reduce to each rank
    weights = {name: W for name, (W, _) in data.items()}
    result = quantize_distributed(weights, accs, functools.partial(first, QUANTIZE))
    with pytest.raises(ValueError, match="no calibration tokens"):      # a module no token reached
        reduce_hessian(HessianAccumulator(8, keep_batches=rank > 0))
    return hessians, owner_h, result


def one_rank(integer, windows, batch_size):
    """The reference: the same accumulator API on one process over the same batches."""
    data = calibration(integer, windows)
    accs = accumulate(data, range(windows), batch_size, keep_batches=False)
    hessians = {name: acc.hessian() for name, acc in accs.items()}
    return hessians, {name: QUANTIZE(W, hessians[name])[0] for name, (W, _) in data.items()}


@pytest.mark.parametrize("integer,world,windows,batch_size", [
    (True, 2, 4, 1),
    (False, 2, 7, 2),      # 4 batches, the last short: 2 per rank
    (False, 3, 10, 2),     # 5 batches: 1, 2, 2
    (False, 3, 3, 2),      # 2 batches: rank 0 gets none
    (False, 3, 2, 2),      # 1 batch: only the last rank has one
])
def test_ranks_match_one_rank_bit_for_bit(integer, world, windows, batch_size):
    ref_h, ref_q = one_rank(integer, windows, batch_size)
    for rank, (hessians, owner_h, result) in enumerate(run_distributed(distributed_run, world, integer,
                                                                      windows, batch_size)):
        assert [h is not None for h in owner_h] == [dst == rank for dst in range(world)]
        assert torch.equal(owner_h[rank], ref_h["fc2"])
        for name in MODULES:
            assert torch.equal(hessians[name], ref_h[name]), name
            got, want = result[name], ref_q[name]
            assert (got.bits, got.group_size, got.sym, got.dim) == (4, 8, False, "oc")
            for field in ("codes", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)


def test_hessian_sum_matches_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g) * torch.linspace(0.5, 5, 12)
    x64 = x.double()
    for keep in (False, True):
        acc = HessianAccumulator(12, keep_batches=keep)
        for chunk in (x[:7], x[7:7], x[7:199].reshape(3, -1, 12), x[199:]):
            acc.add(chunk)
        assert acc.count == 300 and len(acc.batches) == (3 if keep else 0)
        torch.testing.assert_close(acc.hessian().double(), 2 / 300 * x64.T @ x64, rtol=1e-5, atol=1e-5)
        assert acc.hessian().dtype == torch.float32
    assert torch.equal(acc.hessian(), acc.hessian())               # hessian() leaves acc as it was
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(4, 11))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(torch.full((2, 12), float("nan")))
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(12).hessian()


def test_rank_windows_partition():
    for windows in (1, 7, 10, 16):
        for batch_size in (1, 3, 4, 16):
            batches = [range(s, min(s + batch_size, windows)) for s in range(0, windows, batch_size)]
            for world in (1, 2, 3, 8):
                shares = [rank_windows(windows, batch_size, r, world) for r in range(world)]
                assert [i for s in shares for i in s] == list(range(windows))      # contiguous cover
                mine = [[b for b in batches if b.start in s] for s in shares]
                for s, bs in zip(shares, mine):                                   # whole batches
                    assert [i for b in bs for i in b] == list(s)
                counts = [len(bs) for bs in mine]
                assert max(counts) - min(counts) <= 1                             # balanced
    with pytest.raises(ValueError):
        rank_windows(10, 2, 2, 2)
