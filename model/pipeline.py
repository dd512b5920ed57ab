"""The GPT as a flat list of pipeline layers for DeepSpeed's ``PipelineModule``.

Layer i of the list is: 0 the embedding, 1..L the transformer blocks, L+1 the final norm and LM
head; the loss is ``lm_loss``. These are the very modules of ``model.gpt``, so a pipeline stage
computes exactly what the same layers of the plain ``GPT`` compute. ``PipelineModule`` names a
layer's parameters ``"<i>.<name inside the layer>"``; :func:`to_gpt_name` and
:func:`to_pipeline_name` translate between those names and the plain GPT's.
"""
from deepspeed.pipe import LayerSpec

from model.config import GPTConfig
from model.gpt import Block, Embedding, Head, build_layer, megatron_config


class SeededLayerSpec(LayerSpec):
    """A ``LayerSpec`` built as ``model.gpt.build_layer`` builds layer ``index`` of the GPT."""

    def __init__(self, index: int, init_seed: int | None, typename, *args):
        super().__init__(typename, *args)
        self.index, self.init_seed = index, init_seed

    def build(self, log=False):
        return build_layer(self.index, self.init_seed, self.typename, *self.module_args)


def pipeline_layers(cfg: GPTConfig, sequence_parallel: bool = False,
                    init_seed: int | None = None) -> list[LayerSpec]:
    """Layer specs for ``PipelineModule``; each stage builds only its own layers
    (parallel_state must be initialized), with the initial weights of ``build_gpt``'s."""
    mp = megatron_config(sequence_parallel)
    layers = [Embedding] + [Block] * cfg.num_layers + [Head]
    return [SeededLayerSpec(i, init_seed, layer, cfg, mp) for i, layer in enumerate(layers)]


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
