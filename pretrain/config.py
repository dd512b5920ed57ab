"""Training configuration: dataclasses loaded from YAML, overridden from the command line with
``--section.key value``, and validated before any work starts.

Each option is documented once, beside its field in the dataclass that owns it:
``model.config.GPTConfig``, ``ParallelConfig``, ``OptimConfig``, ``TrainConfig`` and
``CheckpointConfig`` below, ``data_prep.config.DataConfig`` and ``qat.config.QATConfig`` /
``KurtosisConfig``. None of these modules imports torch: a config loads, and is refused, at once.
"""
import dataclasses
import difflib
import keyword
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from data_prep.config import DataConfig
from model.config import GPTConfig
from qat.config import KurtosisConfig, QATConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")   # torch.compile's modes


@dataclass
class ParallelConfig:
    """The `parallel:` section: how the world is split. DP size = world size / (tensor * pipeline)."""
    tensor: int = 1                  # tensor-parallel size (must divide heads, MLP width, vocab)
    pipeline: int = 1                # pipeline-parallel stages
    sequence_parallel: bool = False  # split norms/dropout activations along the sequence over TP ranks
    zero_stage: int = 1              # DeepSpeed ZeRO stage: 0, 1 or 2 (pipeline parallelism allows <= 1)
    partition: str = "parameters"    # how layers are split into stages: parameters | type:Block (equal block counts) | uniform


@dataclass
class OptimConfig:
    """The `optim:` section: AdamW with linear warmup then cosine decay."""
    lr: float = 3e-4                 # peak learning rate (clip values use it too)
    min_lr: float = 3e-5             # floor reached at the end of the cosine decay
    warmup_steps: int = 100          # linear warmup from 0 to lr
    decay_steps: int = 0             # cosine length after warmup; 0 = until train.steps
    weight_decay: float = 0.1        # on weight matrices and embeddings; never on biases, norm gains, clips
    beta1: float = 0.9               # AdamW decay of the gradient mean
    beta2: float = 0.95              # AdamW decay of the squared-gradient mean
    eps: float = 1e-8                # AdamW denominator epsilon
    grad_clip: float = 1.0           # clip the global gradient norm (true norm over TP); 0 = off


@dataclass
class TrainConfig:
    """The `train:` section."""
    steps: int = 1000                # optimizer steps
    micro_batch_size: int = 8        # sequences per rank per forward
    global_batch_size: int = 32      # sequences per step = micro_batch_size x DP x gradient accumulation
    bf16: bool = False               # bf16 weights/activations, fp32 master weights (fp32 grad accumulation under PP)
    fp16: bool = False               # fp16 with dynamic loss scaling (pair with model.norm_fp32: true)
    seed: int = 1234                 # initial weights, data order and dropout masks
    log_interval: int = 10           # steps between log lines / TensorBoard points
    eval_interval: int = 100         # steps between validation losses; 0 = only at the end
    eval_iters: int = 10             # validation batches of global_batch_size sequences per evaluation (any layout)
    out_dir: str = "runs/default"    # TensorBoard logs and checkpoints go here
    peak_tflops: float = 0.0         # per-GPU peak for MFU; 0 = look up the GPU (H100/H200 bf16: 989)
    activation_checkpointing: str = "none"  # none | full (recompute each block) | selective (recompute the MLPs)
    max_nonfinite_steps: int = 5     # a step with a non-finite loss or gradient is skipped; this many in a row abort
    stop_at_step: int = 0            # save and exit 0 after this step, as on SIGTERM (time-sliced jobs); 0 = off
    compile: bool = False            # torch.compile each transformer block (QAT/kurtosis kernels as custom ops); needs parallel.tensor 1, no activation checkpointing
    compile_mode: str = "default"    # torch.compile mode of the blocks: default | reduce-overhead (CUDA graphs: replays each block's forward and backward, for host-bound small models) | max-autotune-no-cudagraphs | max-autotune


@dataclass
class CheckpointConfig:
    """The `checkpoint:` section."""
    interval: int = 0                # save every N steps (and always at the end); 0 = only at the end
    keep: int = 3                    # keep the newest K complete checkpoints
    resume: str = "auto"             # auto (newest complete in out_dir/checkpoints) | none | a checkpoint path (CLI: --resume)
    reshard: bool = False            # resume a checkpoint of another TP / PP / DP layout: re-split its model and ZeRO-1/2 optimizer state (random streams start afresh)


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(paths=[]))
    qat: QATConfig = field(default_factory=QATConfig)
    kurtosis: KurtosisConfig = field(default_factory=KurtosisConfig)

    def gradient_accumulation(self, dp: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


def _coerce(value, typ, where: str):
    """Check/convert a YAML value against a dataclass field type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {typ}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dataclass_from_dict(typ, value, where)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if typ is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:   # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if typ in (int, float, str) and not (isinstance(value, typ) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def yaml_key(name: str) -> str:
    """A field's key in YAML and on the command line: a Python keyword (`lambda`) names its field with a
    trailing underscore."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def dataclass_from_dict(cls, data: dict, prefix: str = ""):
    """A dataclass from a YAML mapping: types checked, an unknown key refused with the closest known
    one (a typo is the usual cause) and all of them."""
    # A key that is a Python keyword (`lambda`) names the field with a trailing underscore.
    data = {f"{k}_" if keyword.iskeyword(k) else k: v for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = sorted(yaml_key(n) for n in names)
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(yaml_key(unknown[0]), known, n=1)
        guess = f" (did you mean {where}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {where}{yaml_key(unknown[0])!r}{guess}; "
                          f"known keys{' of ' + prefix if prefix else ''}: {', '.join(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{prefix or 'the top level'}: missing required key {missing[0]!r}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _load_yaml(source, where: str):
    """``yaml.safe_load``, with a YAML error as a one-line ConfigError naming ``where`` (the file or override)."""
    try:
        return yaml.safe_load(source)
    except yaml.MarkedYAMLError as e:
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(f"{where}: invalid YAML at line {e.problem_mark.line + 1}, column "
                          f"{e.problem_mark.column + 1}: {e.problem}{context}") from None
    except yaml.YAMLError as e:  # a character YAML does not allow: no line and column
        raise ConfigError(f"{where}: invalid YAML: {str(e).splitlines()[0]}") from None


def parse_overrides(args: list[str]) -> dict:
    """``['--train.steps', '10', '--model.bias=false']`` -> ``{'train': {'steps': 10}, 'model': {'bias': False}}``."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --section.key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"missing value for --{key}")
            value, i = args[i + 1], i + 1
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _load_yaml(value, f"--{key} {value!r}")
        i += 1
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def config_from_dict(data: dict) -> Config:
    return dataclass_from_dict(Config, data)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    data = {}
    if path:
        with open(path) as f:
            data = _load_yaml(f, path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


def world_size_from_env() -> int:
    """The world size torchrun, the deepspeed launcher and srun set (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(world_size: int, tensor: int, pipeline: int) -> None:
    """That the world splits into tensor x pipeline groups: the one check, for the config before
    launch and for ParallelDims at startup."""
    if tensor < 1 or pipeline < 1:
        raise ConfigError(f"parallel.tensor and parallel.pipeline must be >= 1, got {tensor} and {pipeline}")
    if world_size % (tensor * pipeline):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline "
                          f"= {tensor} x {pipeline}")


def validate(cfg: Config, world_size: int) -> None:
    """Every check that can fail before work starts; raises ConfigError naming the problem."""
    p, t = cfg.parallel, cfg.train
    try:
        cfg.model.validate(p.tensor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.bf16 and t.fp16:
        raise ConfigError("train.bf16 and train.fp16 are both true; choose one")
    check_world_size(world_size, p.tensor, p.pipeline)
    dp = world_size // (p.tensor * p.pipeline)
    if p.zero_stage not in (0, 1, 2):
        raise ConfigError(f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}")
    if t.fp16 and p.zero_stage == 0 and cfg.qat.enabled and cfg.qat.init != "constant":
        raise ConfigError(f"qat.init {cfg.qat.init} sets clips from data, which DeepSpeed's fp16 optimizer "
                          f"without ZeRO cannot take into its master weights: use parallel.zero_stage >= 1 "
                          f"or qat.init constant")
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(f"pipeline parallelism allows ZeRO stage <= 1, got parallel.zero_stage={p.zero_stage}")
    if p.partition not in ("parameters", "uniform") and not p.partition.startswith("type:"):
        raise ConfigError(f"parallel.partition must be parameters, uniform or type:<layer class regex>, "
                          f"got {p.partition!r}")
    if t.activation_checkpointing not in ("none", "full", "selective"):
        raise ConfigError(f"train.activation_checkpointing must be none, full or selective, "
                          f"got {t.activation_checkpointing!r}")
    if t.compile and p.tensor > 1:
        raise ConfigError(f"train.compile needs parallel.tensor=1, got {p.tensor}: megatron-core's TP linears "
                          f"all-reduce asynchronously in backward, which torch.compile cannot trace in one graph")
    if t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")
    if t.compile_mode != "default" and not t.compile:
        raise ConfigError(f"train.compile_mode={t.compile_mode} needs train.compile: true")
    if t.compile and t.activation_checkpointing != "none":
        raise ConfigError(f"train.compile is not yet tested with activation checkpointing; use "
                          f"train.activation_checkpointing: none (got {t.activation_checkpointing})")
    if p.pipeline > cfg.model.num_layers:
        raise ConfigError(f"parallel.pipeline={p.pipeline} exceeds model.num_layers={cfg.model.num_layers}")
    if t.micro_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    if t.max_nonfinite_steps < 1 or t.stop_at_step < 0:
        raise ConfigError("train: need max_nonfinite_steps >= 1 and stop_at_step >= 0")
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError("optim: need warmup_steps >= 0 and min_lr <= lr")
    for section in (cfg.qat, cfg.kurtosis):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
