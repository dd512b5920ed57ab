"""The GPT definition: config, layers, blocks, LM head (megatron-core tensor-parallel layers)."""
from model.gpt import GPT, GPTConfig, Block, Embedding, Head, build_gpt, linears, lm_loss, megatron_config
from model.layers import Linear, Norm
from model.pipeline import pipeline_layers

__all__ = ["GPT", "GPTConfig", "Block", "Embedding", "Head", "Linear", "Norm", "build_gpt", "linears",
           "lm_loss", "megatron_config", "pipeline_layers"]
