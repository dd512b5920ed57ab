"""Layer-input Hessians for GPTQ/AdaDim and the collectives that spread calibration over ranks.

Distributed recipe: calibration is split over ranks by whole forward batches (``rank_windows``),
so every rank runs exactly the batches one rank would run. A Hessian is the fp32 sum of one
``X^T X`` per batch, folded in global batch order ((S_0 + S_1) + S_2) + ... and scaled by 2/N only
at the end. ``reduce_hessian`` keeps that order across ranks with a chain: rank 0 sums its batches
in place and sends the prefix sum to rank 1, which adds its kept batches and sends on, and so on;
the last rank's sum goes to the module's owner rank. Every float operation is then the one a
single rank does, so the Hessian, and the codes that ``quantize_distributed`` solves on the owner
and broadcasts, are bit-identical for any world size (given a deterministic forward and solve).
"""
from typing import Callable, Optional

import torch
import torch.distributed as dist

from quant.grid import QuantizedWeight, check_finite


class HessianAccumulator:
    """H = 2/N sum_b X_b^T X_b over calibration batches, an fp32 sum in batch order.

    One ``add`` is one forward batch. Summed (not a running mean) and scaled once at the end, so
    the result depends only on the batches and their order, not on how they are split over ranks.
    With ``keep_batches`` (every rank of a reduce chain but the first) each batch's ``X^T X`` is
    kept apart until the prefix sum of the earlier ranks arrives: batches x in^2 x 4 bytes of
    memory. Otherwise the sum is accumulated in place (in^2 x 4 bytes whatever the batches).
    """

    def __init__(self, in_features: int, device=None, keep_batches: bool = False):
        self.sum = torch.zeros(in_features, in_features, device=device)
        self.count = 0                   # tokens, kept batches included
        self.keep_batches = keep_batches
        self.batches: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        """Fold in one forward batch of activations [..., in_features] (any leading token dims)."""
        if x.shape[-1] != self.sum.shape[0]:
            raise ValueError(f"activations have {x.shape[-1]} features, expected {self.sum.shape[0]}")
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        check_finite("activations", x)
        if x.shape[0] == 0:
            return
        s = torch.mm(x.T, x)             # mm then add (not addmm): the same float ops on every rank
        if self.keep_batches:
            self.batches.append(s)
        else:
            self.sum.add_(s)
        self.count += x.shape[0]

    def fold(self, prefix: torch.Tensor) -> torch.Tensor:
        """``prefix`` (modified in place) plus the kept batches, in order."""
        for s in self.batches:
            prefix.add_(s)
        return prefix

    def hessian(self) -> torch.Tensor:
        """2/N sum X^T X of this accumulator's batches alone: what one rank running them gets."""
        return _scaled(self.fold(self.sum.clone()), self.count)


def _scaled(total: torch.Tensor, count: int) -> torch.Tensor:
    if count == 0:
        raise ValueError("no calibration tokens reached this module on any rank")
    return total * (2 / count)


def rank_windows(num_windows: int, batch_size: int, rank: int, world_size: int) -> range:
    """The calibration window indices ``rank`` runs: a contiguous, balanced share of whole forward
    batches (``batch_size`` consecutive windows, the last one may be short), so that each rank's
    batches are exactly batches of the one-rank run and the Hessians can match it bit for bit."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = -(-num_windows // batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return range(min(first * batch_size, num_windows), min(last * batch_size, num_windows))


def owner_rank(module_index: int, world_size: int) -> int:
    """Round-robin owner of the module at ``module_index`` in the (rank-independent) order."""
    return module_index % world_size


def reduce_hessian(acc: HessianAccumulator, dst: Optional[int] = None,
                   group=None) -> Optional[torch.Tensor]:
    """The Hessian of all ranks' batches, on ``dst`` only, or on all ranks when dst is None; other
    ranks get None. ``dst`` is a rank within ``group``. Does not modify ``acc``.

    Chain sum in rank order (send/recv, NCCL or gloo): rank r receives the prefix sum and token
    count of ranks < r, adds its kept batches and passes both on; ranks without batches just pass
    them on. Rank 0 starts from its in-place sum, the others must use ``keep_batches``.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def peer(r):
        return r if group is None else dist.get_global_rank(group, r)

    device = acc.sum.device
    count = torch.tensor([acc.count], dtype=torch.int64, device=device)
    if rank == 0:
        total = acc.fold(acc.sum.clone()) if acc.batches else acc.sum   # only read from here on
    else:
        if not acc.keep_batches and acc.count:
            raise ValueError(f"rank {rank} summed its batches in place; only the first rank of the chain "
                             f"may: build its HessianAccumulator with keep_batches=True")
        total, prefix_count = torch.empty_like(acc.sum), torch.empty_like(count)
        dist.recv(total, peer(rank - 1), group=group)
        dist.recv(prefix_count, peer(rank - 1), group=group)
        total, count = acc.fold(total), count + prefix_count
    last = world - 1
    if rank < last:
        dist.send(total, peer(rank + 1), group=group)
        dist.send(count, peer(rank + 1), group=group)
    if dst is None:
        if rank != last:
            total = torch.empty_like(acc.sum)
        dist.broadcast(total, peer(last), group=group)
        dist.broadcast(count, peer(last), group=group)
    elif dst != last:
        if rank == last:
            dist.send(total, peer(dst), group=group)
            dist.send(count, peer(dst), group=group)
        elif rank == dst:
            total = torch.empty_like(acc.sum)
            dist.recv(total, peer(last), group=group)
            dist.recv(count, peer(last), group=group)
    if dst is not None and rank != dst:
        return None
    return _scaled(total, int(count.item()))


def broadcast_quantized(qw: Optional[QuantizedWeight], src: int, group=None,
                        device=None) -> QuantizedWeight:
    """Send ``qw`` from rank ``src`` (within ``group``) to all; other ranks pass None."""
    global_src = src if group is None else dist.get_global_rank(group, src)
    is_src = dist.get_rank(group) == src
    meta = [None]
    if is_src:
        meta = [{"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "dim": qw.dim,
                 "tensors": [(tuple(getattr(qw, f).shape), str(getattr(qw, f).dtype))
                             for f in QuantizedWeight.TENSORS]}]
        device = qw.codes.device
    obj_device = device if device is not None and torch.device(device).type == "cuda" else None
    dist.broadcast_object_list(meta, global_src, group=group, device=obj_device)
    meta = meta[0]
    tensors = []
    for field, (shape, dtype) in zip(QuantizedWeight.TENSORS, meta["tensors"]):
        # contiguous: AdaDim's per-IC codes are a transposed view (NCCL refuses it, gloo sent the storage order)
        t = getattr(qw, field).contiguous() if is_src else torch.empty(
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
