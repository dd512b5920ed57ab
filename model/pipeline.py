"""The GPT as a flat list of pipeline layers for DeepSpeed's ``PipelineModule``.

Layer i of the list is: 0 the embedding, 1..L the transformer blocks, L+1 the final norm and LM
head; the loss is ``lm_loss``. These are the very modules of ``model.gpt``, so a pipeline stage
computes exactly what the same layers of the plain ``GPT`` compute. ``PipelineModule`` names a
layer's parameters ``"<i>.<name inside the layer>"``; :func:`to_gpt_name` and
:func:`to_pipeline_name` translate between those names and the plain GPT's.
"""
from deepspeed.pipe import LayerSpec

from model.gpt import Block, Embedding, GPTConfig, Head, megatron_config


def pipeline_layers(cfg: GPTConfig, sequence_parallel: bool = False) -> list[LayerSpec]:
    """Layer specs for ``PipelineModule``; each stage builds only its own layers
    (parallel_state must be initialized)."""
    mp = megatron_config(sequence_parallel)
    return ([LayerSpec(Embedding, cfg, mp)] + [LayerSpec(Block, cfg, mp) for _ in range(cfg.num_layers)]
            + [LayerSpec(Head, cfg, mp)])


def to_gpt_name(name: str, num_layers: int) -> str:
    """``"3.attn.qkv.linear.weight"`` -> ``"blocks.2.attn.qkv.linear.weight"``."""
    index, rest = name.split(".", 1)
    i = int(index)
    if i == 0:
        return f"embedding.{rest}"
    return f"head.{rest}" if i == num_layers + 1 else f"blocks.{i - 1}.{rest}"


def to_pipeline_name(name: str, num_layers: int) -> str:
    """Inverse of :func:`to_gpt_name`."""
    part, rest = name.split(".", 1)
    if part == "embedding":
        return f"0.{rest}"
    if part == "head":
        return f"{num_layers + 1}.{rest}"
    index, rest = rest.split(".", 1)
    return f"{int(index) + 1}.{rest}"
