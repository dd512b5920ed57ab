"""The GPT: embedding, pre-norm transformer blocks, final norm and LM head.

Activations flow as [sequence, batch, hidden] (megatron's layout, which sequence parallelism
splits along its first dim). Tensor parallelism lives inside megatron-core's layers; this file
only says which linears are column- and which row-parallel.
"""
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

from kernels import cross_entropy
from model.config import GPTConfig
from model.layers import Linear, Norm, activation, apply_rope, init_std_scaled, rope_cache


class Embedding(torch.nn.Module):
    """Token (+ learned position) embedding; scatters the sequence over TP ranks under SP."""

    def __init__(self, cfg: GPTConfig, mp: ModelParallelConfig):
        super().__init__()
        init = lambda w: torch.nn.init.normal_(w, std=cfg.init_std)  # noqa: E731
        self.tokens = tensor_parallel.VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=init, config=mp)
        self.positions = None
        if cfg.positions == "learned":
            self.positions = torch.nn.Embedding(cfg.seq_length, cfg.hidden_size)
            init(self.positions.weight)
        self.sequence_parallel = mp.sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tokens(tokens)                                       # [b, s, h]
        if self.positions is not None:
            x = x + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        x = x.transpose(0, 1).contiguous()                            # [s, b, h]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        return x


@functools.lru_cache(maxsize=8)
def _rope(seq_len: int, head_dim: int, device: torch.device):
    cos, sin = rope_cache(seq_len, head_dim)
    return cos.to(device), sin.to(device)


class Attention(torch.nn.Module):
    """Causal multi-head self-attention; each TP rank owns whole heads."""

    def __init__(self, cfg: GPTConfig, mp: ModelParallelConfig):
        super().__init__()
        # qkv rows are laid out [head, (q, k, v), head_dim], so a contiguous TP split gives
        # each rank whole heads with their q, k and v.
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, parallel="column", bias=cfg.bias,
                          init_std=cfg.init_std, mp_config=mp)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, parallel="row", bias=cfg.bias,
                           init_std=init_std_scaled(cfg.init_std, cfg.num_layers), mp_config=mp)
        self.head_dim = cfg.head_dim
        self.rope = cfg.positions == "rope"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)                                             # [s, b, 3h/tp]
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, -1, 3, self.head_dim).permute(3, 1, 2, 0, 4).unbind(0)  # [b, nh, s, hd]
        if self.rope:
            cos, sin = _rope(s, self.head_dim, q.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [b, nh, s, hd]
        return self.proj(y.permute(2, 0, 1, 3).flatten(2))            # [s, b, h/tp], a view


class MLP(torch.nn.Module):
    def __init__(self, cfg: GPTConfig, mp: ModelParallelConfig):
        super().__init__()
        self.kind = cfg.mlp
        # SwiGLU's fc1 rows interleave (gate, up) pairs so a contiguous TP split keeps pairs together.
        fc1_out = cfg.ffn_size * (2 if self.kind == "swiglu" else 1)
        self.fc1 = Linear(cfg.hidden_size, fc1_out, parallel="column", bias=cfg.bias,
                          init_std=cfg.init_std, mp_config=mp)
        self.fc2 = Linear(cfg.ffn_size, cfg.hidden_size, parallel="row", bias=cfg.bias,
                          init_std=init_std_scaled(cfg.init_std, cfg.num_layers), mp_config=mp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, quant = self.fc1(x), self.fc2.input_quant
        if quant is not None and quant.fuse_into_producer:   # fc2's input quantizer, in the activation's kernel
            return self.fc2(quant.quantize_act(a, self.kind))
        return self.fc2(activation(a, self.kind))


class Block(torch.nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: GPTConfig, mp: ModelParallelConfig):
        super().__init__()
        norm = lambda: Norm(cfg.hidden_size, cfg.norm, cfg.bias, cfg.norm_fp32, cfg.norm_eps,  # noqa: E731
                            mp.sequence_parallel)
        self.norm1, self.attn = norm(), Attention(cfg, mp)
        self.norm2, self.mlp = norm(), MLP(cfg, mp)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each norm gets the input quantizer of the linear it feeds (None without QAT).
        h = self.norm1(x, quant=self.attn.qkv.input_quant)
        x = x + F.dropout(self.attn(h), self.dropout, self.training)
        h = self.norm2(x, quant=self.mlp.fc1.input_quant)
        return x + F.dropout(self.mlp(h), self.dropout, self.training)


class Head(torch.nn.Module):
    """Final norm and the (untied) output projection to vocabulary-parallel logits."""

    def __init__(self, cfg: GPTConfig, mp: ModelParallelConfig):
        super().__init__()
        self.norm = Norm(cfg.hidden_size, cfg.norm, cfg.bias, cfg.norm_fp32, cfg.norm_eps, mp.sequence_parallel)
        self.output = Linear(cfg.hidden_size, cfg.vocab_size, parallel="column", bias=False,
                             init_std=cfg.init_std, mp_config=mp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x, quant=self.output.input_quant))  # [s, b, V/tp]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits [s, b, V/tp] (vocab split over TP), labels [b, s].
    Its backward overwrites the logits with their gradient (kernels.cross_entropy)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group_sum = (functools.partial(dist.all_reduce, group=parallel_state.get_tensor_model_parallel_group())
                 if tp > 1 else None)
    return cross_entropy(logits, labels.t(), rank=parallel_state.get_tensor_model_parallel_rank(), ranks=tp,
                         all_reduce=group_sum).mean()


def build_layer(index: int, init_seed: int | None, layer: type, *args) -> torch.nn.Module:
    """Layer ``index`` of the model (0 embedding, 1..L blocks, L+1 head) drawing its initial
    weights from seed ``init_seed + index``: a pipeline stage that builds only its own layers then
    starts from the same weights as the whole model. No reseeding when ``init_seed`` is None."""
    if init_seed is not None:
        torch.manual_seed(init_seed + index)
    return layer(*args)


class GPT(torch.nn.Module):
    def __init__(self, cfg: GPTConfig, mp: ModelParallelConfig, init_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embedding = build_layer(0, init_seed, Embedding, cfg, mp)
        self.blocks = torch.nn.ModuleList(build_layer(i + 1, init_seed, Block, cfg, mp)
                                          for i in range(cfg.num_layers))
        self.head = build_layer(cfg.num_layers + 1, init_seed, Head, cfg, mp)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [s, b, V/tp] for tokens [b, s]; the mean loss instead when labels are given."""
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits if labels is None else lm_loss(logits, labels)


def megatron_config(sequence_parallel: bool = False) -> ModelParallelConfig:
    """megatron-core layer config for the current parallel groups. Weights are initialized on
    the CPU from the full (unsplit) matrix, so every TP layout starts from the same model."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32,
        gradient_accumulation_fusion=False)


def build_gpt(cfg: GPTConfig, sequence_parallel: bool = False, init_seed: int | None = None) -> GPT:
    """The GPT for this rank's TP shard (parallel_state must be initialized)."""
    cfg.validate(parallel_state.get_tensor_model_parallel_world_size())
    return GPT(cfg, megatron_config(sequence_parallel), init_seed)


def linears(model: torch.nn.Module):
    """(name, Linear) for every linear layer, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
