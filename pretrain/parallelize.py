"""Build this rank's model for a parallel layout: the plain GPT (PP = 1) or its pipeline stage
(PP > 1, DeepSpeed's ``PipelineModule`` over ``model.pipeline_layers``), then activation
checkpointing, then torch.compile of the blocks. One function, so every entry point and test
builds the same thing."""
import functools

import torch
import torch.utils.checkpoint
from deepspeed.pipe import PipelineModule
from megatron.core import parallel_state
from megatron.core import utils as megatron_utils

from model.gpt import MLP, Block, build_gpt, lm_loss
from model.pipeline import pipeline_layers
from pretrain.config import Config
from pretrain.parallel_dims import ParallelDims, deepspeed_topology
from qat.quantizer import checkpointed


def checkpoint_activations(model: torch.nn.Module, mode: str) -> None:
    """Recompute activations in backward instead of keeping them: ``full`` recomputes each
    transformer block (only its input is kept), ``selective`` only the MLPs (their 4h-wide
    intermediates are the largest activations; attention keeps no score matrix under SDPA).
    The forward is wrapped in place, so parameter names and checkpoints are unchanged."""
    if mode == "none":
        return
    kind = Block if mode == "full" else MLP
    for module in model.modules():
        if isinstance(module, kind):
            module.forward = functools.partial(torch.utils.checkpoint.checkpoint,
                                               functools.partial(_run_checkpointed, module.forward),
                                               use_reentrant=False)


def _run_checkpointed(forward, *args, **kwargs):
    """The checkpointed forward, first pass and recompute alike, marked for the QAT quantizers."""
    with checkpointed():
        return forward(*args, **kwargs)


@torch.compiler.substitute_in_graph(megatron_utils.get_tensor_model_parallel_group_if_none)
def _tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
    """megatron-core's function without its deprecation warning (RowParallelLinear passes no group
    and warns on every call; torch.compile cannot trace ``warnings.warn`` and would break the graph)."""
    if tp_group is not None or not torch.distributed.is_initialized() or not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def compile_blocks(model: torch.nn.Module, mode: str = "default") -> None:
    """torch.compile each transformer block in place (``Module.compile``: parameter names and
    checkpoints unchanged), one graph per block with no breaks (``fullgraph``): the QAT and
    kurtosis kernels are custom ops there, and inductor fuses the elementwise work around them and
    the matmuls. Per block, not the whole model, so a pipeline stage compiles the same way and the
    embedding and megatron's vocab-parallel loss stay eager (DeepSpeed's ``engine.compile`` compiles
    the whole module). Blocks share one compiled graph; guards recompile it when the QAT step
    activates the quantizers and on log steps (record_stats), so a handful of variants. ``mode``
    is torch.compile's (``train.compile_mode``): reduce-overhead replays each block's forward and
    backward as CUDA graphs (cudagraph trees), one launch where eager dispatches hundreds."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(fullgraph=True, dynamic=False, mode=mode)


def build_model(cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    """This rank's modules: the whole GPT, or its pipeline stage with the loss on the last stage;
    the same initial weights under every TP / PP layout (``train.seed``)."""
    sp, seed = cfg.parallel.sequence_parallel, cfg.train.seed
    if dims.pp == 1:
        model = build_gpt(cfg.model, sp, seed)
    else:
        cfg.model.validate(dims.tp)
        model = PipelineModule(pipeline_layers(cfg.model, sp, seed), topology=deepspeed_topology(dims), loss_fn=lm_loss,
                               partition_method=cfg.parallel.partition)
    checkpoint_activations(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(model, cfg.train.compile_mode)
    return model


def is_pipeline(model: torch.nn.Module) -> bool:
    return isinstance(model, PipelineModule)
