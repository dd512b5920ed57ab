"""Layer-input Hessians for GPTQ/AdaDim and the collectives that spread calibration over ranks.

Distributed recipe: each rank runs its share of the calibration windows (``rank_windows``) and
accumulates every module's Hessian locally; ``quantize_distributed`` then sums each module's
Hessian (token-count weighted) onto its owner rank, modules assigned round-robin, quantizes it
there and broadcasts the codes back, so every rank ends with the same result as one rank would.
"""
from typing import Callable, Optional

import torch
import torch.distributed as dist

from quant.rtn import QuantizedWeight, check_finite


class HessianAccumulator:
    """Running mean H = 2/N sum x x^T over calibration tokens, in float32.

    A running mean (not a sum) keeps the entries at the scale of one token's x x^T however many
    tokens are fed.
    """

    def __init__(self, in_features: int, device=None):
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of activations [..., in_features] (any leading token dims)."""
        if x.shape[-1] != self.hessian.shape[0]:
            raise ValueError(f"activations have {x.shape[-1]} features, expected "
                             f"{self.hessian.shape[0]}")
        x = x.reshape(-1, x.shape[-1]).to(device=self.hessian.device, dtype=torch.float32)
        check_finite("activations", x)
        if x.shape[0] == 0:
            return
        total = self.count + x.shape[0]
        self.hessian.addmm_(x.T, x, beta=self.count / total, alpha=2 / total)
        self.count = total


def rank_windows(num_windows: int, rank: int, world_size: int) -> range:
    """The contiguous, balanced share of calibration window indices that ``rank`` runs."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return range(num_windows * rank // world_size, num_windows * (rank + 1) // world_size)


def owner_rank(module_index: int, world_size: int) -> int:
    """Round-robin owner of the module at ``module_index`` in the (rank-independent) order."""
    return module_index % world_size


def reduce_hessian(acc: HessianAccumulator, dst: Optional[int] = None,
                   group=None) -> Optional[torch.Tensor]:
    """Token-weighted mean of every rank's Hessian: on ``dst`` only (reduce), or on all ranks
    (all-reduce) when dst is None; other ranks get None. ``dst`` is a rank within ``group``."""
    weighted = acc.hessian * acc.count
    count = torch.tensor([float(acc.count)], dtype=torch.float64, device=weighted.device)
    if dst is None:
        dist.all_reduce(weighted, group=group)
        dist.all_reduce(count, group=group)
    else:
        global_dst = dst if group is None else dist.get_global_rank(group, dst)
        dist.reduce(weighted, global_dst, group=group)
        dist.reduce(count, global_dst, group=group)
        if dist.get_rank(group) != dst:
            return None
    if count.item() == 0:
        raise ValueError("no calibration tokens reached this module on any rank")
    return weighted / count.item()


_QW_TENSORS = ("codes", "scales", "zeros", "g_idx")


def broadcast_quantized(qw: Optional[QuantizedWeight], src: int, group=None,
                        device=None) -> QuantizedWeight:
    """Send ``qw`` from rank ``src`` (within ``group``) to all; other ranks pass None."""
    global_src = src if group is None else dist.get_global_rank(group, src)
    is_src = dist.get_rank(group) == src
    meta = [None]
    if is_src:
        meta = [{"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "dim": qw.dim,
                 "tensors": [(tuple(getattr(qw, f).shape), str(getattr(qw, f).dtype))
                             for f in _QW_TENSORS]}]
        device = qw.codes.device
    obj_device = device if device is not None and torch.device(device).type == "cuda" else None
    dist.broadcast_object_list(meta, global_src, group=group, device=obj_device)
    meta = meta[0]
    tensors = []
    for field, (shape, dtype) in zip(_QW_TENSORS, meta["tensors"]):
        t = getattr(qw, field) if is_src else torch.empty(
            shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
        dist.broadcast(t, global_src, group=group)
        tensors.append(t)
    return QuantizedWeight(*tensors, meta["bits"], meta["group_size"], meta["sym"], meta["dim"])


def quantize_distributed(weights: dict[str, torch.Tensor],
                         accumulators: dict[str, HessianAccumulator],
                         quantize: Callable[[torch.Tensor, torch.Tensor], QuantizedWeight],
                         group=None, first_index: int = 0) -> dict[str, QuantizedWeight]:
    """Quantize each module on its owner rank from the all-rank Hessian; results on all ranks.

    ``weights`` must list the same modules in the same order on every rank; ``quantize(W, H)``
    is e.g. ``lambda W, H: gptq_quantize(W, H, bits=4)[0]``. All Hessians are reduced first, then
    every rank quantizes the modules it owns concurrently, then the results are broadcast.
    ``first_index`` is the position of the first module in a longer model-wide order, so calls
    that each quantize a few modules (true-sequential GPTQ) still spread owners over the ranks.
    """
    world = dist.get_world_size(group)
    names = list(weights)
    owners = [owner_rank(first_index + i, world) for i in range(len(names))]
    owned = {}
    for name, owner in zip(names, owners):
        hessian = reduce_hessian(accumulators[name], owner, group)
        if hessian is not None:
            owned[name] = hessian
    results = {name: quantize(weights[name], hessian) for name, hessian in owned.items()}
    return {name: broadcast_quantized(results.get(name), owner, group, weights[name].device)
            for name, owner in zip(names, owners)}
