"""The GPT's config, apart from the model: it loads without torch, as the training config and
``python -m pretrain.train --help`` need."""
from dataclasses import dataclass


@dataclass
class GPTConfig:
    """Model shape and recipe knobs (the `model:` section of a training config)."""
    vocab_size: int = 8192           # embedding rows; >= the tokenizer's vocabulary, divisible by TP
    seq_length: int = 256            # tokens per training window
    hidden_size: int = 256           # width of the residual stream
    num_layers: int = 4              # transformer blocks
    num_heads: int = 4               # attention heads; they divide hidden_size
    mlp_ratio: float = 4.0           # MLP inner width = mlp_ratio * hidden_size
    norm: str = "layernorm"          # layernorm | rmsnorm
    norm_eps: float = 1e-5           # added to the variance in every norm
    norm_fp32: bool = False          # compute norms in fp32 (fp16 training needs it)
    mlp: str = "gelu"                # gelu | swiglu
    positions: str = "learned"       # learned | rope
    bias: bool = True                # biases in linears and layernorms
    init_std: float = 0.02           # normal init; residual-writing projections get std/sqrt(2L)
    dropout: float = 0.0             # on attention and MLP outputs before each residual add

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)

    def validate(self, tp: int = 1) -> None:
        """Raise ValueError naming the first inconsistent shape setting."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}")
        if self.num_heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide model.num_heads={self.num_heads}")
        if self.ffn_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the MLP width {self.ffn_size}")
        if self.vocab_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide model.vocab_size={self.vocab_size}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got {self.head_dim}")
        for name, value, allowed in (("norm", self.norm, ("layernorm", "rmsnorm")),
                                     ("mlp", self.mlp, ("gelu", "swiglu")),
                                     ("positions", self.positions, ("learned", "rope"))):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
