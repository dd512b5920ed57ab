"""The `qat:` and `kurtosis:` sections of a training config, apart from the quantizers: they load
without torch, as the training config and ``python -m pretrain.train --help`` need."""
from dataclasses import dataclass, field

LINEAR_NAMES = ("qkv", "proj", "fc1", "fc2", "output")
INITS = ("constant", "minmax", "mse")


@dataclass
class QATConfig:
    """The `qat:` section: fake-quantize linear inputs with learned clips during pretraining.

    ``init: mse`` takes, of the first quantized batch's mean +- k std (k = 1 .. 8, inside its
    min/max), the clips with the least squared quantization error, per layer; ``minmax`` its
    min/max. Per-layer clips are what brings QAT's W4A4 perplexity to the baseline's
    (docs/benchmarks.md), as does a start after warmup."""
    enabled: bool = False            # fake-quantize the inputs of `layers` while training
    bits: int = 4                    # activation bits (2..8)
    init: str = "mse"                # clips from the first quantized batch: mse | minmax | constant (+-init_value)
    init_value: float = 2.0          # init=constant: clips at +-init_value (2 beat the paper's 4)
    start_step: int = 0              # quantization is off before this step (GPU configs: 2 x warmup)
    layers: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])  # of: qkv proj fc1 fc2 output (LM head)
    recompute_inputs: bool = False   # backward rebuilds each norm's / MLP activation's quantized output from its input instead of keeping it (2 x hidden + ffn bf16 less per token and layer, one memory-bound kernel more per site)

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"qat.bits must be in 2..8, got {self.bits}")
        if self.init not in INITS:
            raise ValueError(f"qat.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "constant" and self.init_value <= 0:
            raise ValueError(f"qat.init_value must be > 0, got {self.init_value}")
        bad = sorted(set(self.layers) - set(LINEAR_NAMES))
        if bad:
            raise ValueError(f"qat.layers: unknown linear {bad[0]!r}; choose from {', '.join(LINEAR_NAMES)}")


@dataclass
class KurtosisConfig:
    """The `kurtosis:` section: penalize the per-token kurtosis of linear-layer outputs."""
    enabled: bool = False            # add the penalty's gradient at the `sites` outputs
    lambda_: float = 1e-3            # strength; the default is measured in docs/benchmarks.md
    reduce: str = "mean"             # over tokens: mean | sum (sum makes lambda scale with the micro-batch)
    sites: str = "residual"          # residual: attention out-projection and MLP fc2 | all: every block linear
    eps: float = 1e-20               # kappa = m4 / (m2^2 + eps); the kernels' default, argued in kernels/kurtosis.py

    def validate(self) -> None:
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"kurtosis.reduce must be 'mean' or 'sum', got {self.reduce!r}")
        if self.sites not in ("residual", "all"):
            raise ValueError(f"kurtosis.sites must be 'residual' or 'all', got {self.sites!r}")
        if self.lambda_ < 0:
            raise ValueError(f"kurtosis.lambda must be >= 0, got {self.lambda_}")
