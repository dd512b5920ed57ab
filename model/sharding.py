"""Tensor-parallel layout of the model's parameters: split a full state dict into this rank's
shard, and gather the shards back. Reads megatron-core's marks (``tensor_model_parallel``,
``partition_dim``); every unmarked parameter is replicated over the TP group."""
import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _split_dim(param: torch.Tensor):
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def shard_state_dict(full: dict, model: torch.nn.Module) -> dict:
    """This TP rank's slice of a full (TP=1) state dict, keyed like ``model.state_dict()``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = {}
    for name, param in model.named_parameters():
        if name not in full:
            raise KeyError(f"parameter {name!r} is missing from the full state dict")
        tensor, dim = full[name], _split_dim(param)
        if dim is not None:
            tensor = tensor.chunk(tp, dim=dim)[rank]
        if tensor.shape != param.shape:
            raise ValueError(f"{name}: full tensor gives shard {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
        shard[name] = tensor.clone()
    return shard


def gather_state_dict(model: torch.nn.Module, tensors: dict | None = None) -> dict:
    """The full (TP=1) tensors of ``model``'s parameters, on every TP rank. ``tensors`` maps
    parameter names to per-rank tensors of the parameters' shapes (e.g. gradients); by default
    the parameters themselves."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    full = {}
    for name, param in model.named_parameters():
        local = (tensors[name] if tensors is not None else param).detach()
        dim = _split_dim(param)
        if dim is None or tp == 1:
            full[name] = local.clone()
            continue
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        full[name] = torch.cat(parts, dim=dim)
    return full
