"""The GPT definition: ``model.config.GPTConfig``; ``model.gpt`` (embedding, blocks, LM head,
``build_gpt``) and ``model.layers`` on megatron-core's tensor-parallel layers; ``model.pipeline``
(``pipeline_layers``). Nothing is imported here, so ``model.config`` loads without torch."""
