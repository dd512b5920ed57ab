"""Distributed start-up: process groups for TP x DP x PP, built once, shared by megatron-core and
DeepSpeed.

Rank order is TP fastest, then DP, then PP, both in megatron-core (``order="tp-cp-ep-dp-pp"``) and
in DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model); ``init_distributed``
asserts the two agree on every rank's coordinates.
"""
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.config import ParallelConfig, check_world_size, world_size_from_env
from quiet import without_known_prints


@dataclass(frozen=True)
class ParallelDims:
    """The single source of parallel truth for one run."""
    world: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def validate(self) -> None:
        check_world_size(self.world, self.tp, self.pp)


class MegatronMPU:
    """The model-parallel-unit interface DeepSpeed asks for, answered by megatron-core's groups.
    With it, DeepSpeed reduces gradients over the DP group only and computes the clipping norm
    over the TP group, counting replicated parameters once."""
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    # DeepSpeed's older names for the same: model parallelism is the TP group here
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)


def _single_process_env() -> None:
    """Let `python -m pretrain.train` run without a launcher: a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _megatron_on_cpu() -> None:
    """megatron-core allocates its sequence-parallel communication buffers with
    ``device=torch.cuda.current_device()``; on CPU-only hosts (development machines, CI) that call
    raises, so answer it with the CPU. GPU hosts are untouched."""
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"


def init_distributed(cfg: ParallelConfig) -> ParallelDims:
    """Join the job started by torchrun / the deepspeed launcher / SLURM (or a world of one) and
    build the TP, DP and PP groups. NCCL on GPUs, gloo on CPUs."""
    import deepspeed

    _single_process_env()
    dims = ParallelDims(world=world_size_from_env(), tp=cfg.tensor, pp=cfg.pipeline)
    dims.validate()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _megatron_on_cpu()
    if not dist.is_initialized():
        with without_known_prints():   # DeepSpeed prints that it built its shared-memory comm op
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                       verbose=False)
    if dist.get_world_size() != dims.world:
        raise RuntimeError(f"WORLD_SIZE={dims.world} but the process group has {dist.get_world_size()} ranks")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp, order="tp-cp-ep-dp-pp")
    check_topology_agrees(dims)
    return dims


def deepspeed_topology(dims: ParallelDims):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)


def check_topology_agrees(dims: ParallelDims) -> None:
    """megatron-core and DeepSpeed must place this rank at the same (pipe, data, model) coordinate."""
    coord = deepspeed_topology(dims).get_coord(dist.get_rank())
    ours = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != ours:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed topology says (pipe, data, model) = "
                           f"{(coord.pipe, coord.data, coord.model)}, megatron-core says {ours}")


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
