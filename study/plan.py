"""A study plan: one YAML file that names a base training config, the overrides every run shares,
the arms (name + overrides), seeds, evaluation points and post-training specs.

:func:`load_plan` checks all of it before any work starts, including every run's full training
config (``pretrain.config.validate``), so a typo in arm 7 fails in the first second, not after
six arms have trained. The fields are documented once, here; ``configs/study/*.yaml`` are the
committed plans.
"""
import json
import os
import re
from dataclasses import dataclass, field

import yaml

from pretrain.config import Config, ConfigError, dataclass_from_dict, load_config, validate
from quant.evaluate import parse_config
from quant.quantize import QuantSpec

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DataPrep:
    """`data:` the corpus every run trains on, tokenized once by data_prep into OUT/data (left
    out: the runs use the data paths of the base config and overrides as they are)."""
    corpus: str = ""                 # directory of jsonl[.xz|.gz] shards (python -m study --corpus overrides it)
    shards: list[str] = field(default_factory=list)  # training shard file names; [] = every shard but `valid`
    valid: str = "valid.jsonl.xz"    # the held-out shard (validation loss)
    vocab_size: int = 8192           # SentencePiece vocabulary; also sets model.vocab_size
    model_type: str = "bpe"          # bpe | unigram
    max_sentences: int = 400_000     # tokenizer training sample
    workers: int = 8                 # tokenization processes


@dataclass
class PostTrain:
    """One entry of `posttrain:`: weights by ``python -m quant.quantize``, then ``quant.evaluate`` of
    `configs` with those weights (at other weight widths it uses its own RTN / int8)."""
    name: str                        # key of this spec's results (e.g. gptq-w4g128)
    method: str = "gptq"             # rtn | gptq | adadim-rtn | adadim-gptq
    bits: int = 4
    group_size: int = 128            # -1 = per output channel
    act_order: bool = True
    nsamples: int = 128              # calibration windows (C4 calibration slice)
    configs: list[str] = field(default_factory=lambda: ["W16A16", "W8A8", "W4A16", "W4A4"])
    points: str = "all"              # all evaluation points | final (the run's last step only)
    arms: list[str] = field(default_factory=list)    # arms this spec runs on; [] = every arm


@dataclass
class Evaluation:
    """`evaluation:` what quant.evaluate and quant.analyze measure at every point."""
    ppl_windows: int = 0             # at most this many perplexity windows per corpus; 0 = all
    tasks: list[str] = field(default_factory=list)   # zero-shot tasks (quant.tasks); [] = perplexity only
    task_limit: int = 0              # examples per task; 0 = all
    analyze_nsamples: int = 16       # calibration windows for quant.analyze
    batch_size: int = 8


@dataclass
class Arm:
    """One entry of `arms:`: a recipe, as config overrides on top of the plan's."""
    name: str
    overrides: dict = field(default_factory=dict)    # nested sections or dotted keys: {qat.enabled: false}
    seeds: list[int] | None = None   # default: the plan's seeds
    lengths: list[int] | None = None  # default: the plan's lengths
    fractions: list[float] | None = None  # default: the plan's fractions (e.g. [1.0]: the end only)


@dataclass
class Plan:
    """The whole study. Runs: every arm x its seeds at `train.steps` (evaluated at `fractions` of
    that run, from its intermediate checkpoints) plus, for each of `lengths`, a separate run of that
    many steps with its own LR schedule (evaluated at its end)."""
    name: str
    base: str                        # training config YAML (relative to the working directory)
    arms: list[Arm]
    overrides: dict = field(default_factory=dict)    # shared by every run (nested sections or dotted keys)
    seeds: list[int] = field(default_factory=lambda: [1234])
    fractions: list[float] = field(default_factory=lambda: [1.0])  # of train.steps; the final step is always one
    lengths: list[int] = field(default_factory=list)  # extra run lengths (steps), each a run of its own
    warmup_fraction: float = 0.0     # > 0: optim.warmup_steps = this x the run's steps (every length)
    qat_start_fraction: float = 0.0  # > 0: qat.start_step = this x the run's steps
    baseline: str = "baseline"       # the arm whose W16A16 is every arm's headline reference
    gpus_per_run: int = 1            # training processes per run (torchrun), each on its own GPU
    posttrain: list[PostTrain] = field(default_factory=lambda: [PostTrain("gptq-w4g128")])
    evaluation: Evaluation = field(default_factory=Evaluation)
    data: DataPrep | None = None

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def runs(self) -> list["Run"]:
        """Every run of the plan, in plan order (arms, then seeds, then the main length first)."""
        out = []
        for arm in self.arms:
            steps = self.main_steps(arm)
            lengths = arm.lengths if arm.lengths is not None else self.lengths
            for seed in (arm.seeds if arm.seeds is not None else self.seeds):
                out.append(Run(f"{arm.name}-seed{seed}", arm.name, seed, steps, self.points(steps, arm)))
                for length in sorted(set(lengths) - {steps}):
                    out.append(Run(f"{arm.name}-seed{seed}-steps{length}", arm.name, seed, length, (length,)))
        return out

    def main_steps(self, arm: Arm) -> int:
        """train.steps of the arm's main run (the plan's, unless the arm overrides it)."""
        try:
            return load_config(self.base, flatten(self.overrides) + flatten(arm.overrides)).train.steps
        except ConfigError as e:
            raise ConfigError(f"arm {arm.name}: {e}") from None

    def points(self, steps: int, arm: Arm) -> tuple[int, ...]:
        fractions = arm.fractions if arm.fractions is not None else self.fractions
        return tuple(sorted({max(1, round(f * steps)) for f in fractions} | {steps}))

    def specs_for(self, run: "Run", step: int) -> list[PostTrain]:
        return [s for s in self.posttrain if (not s.arms or run.arm in s.arms)
                and (s.points == "all" or step == run.steps)]

    def run_config(self, run: "Run", out_dir: str, data_dir: str | None = None) -> Config:
        """The full training config of one run: base <- plan overrides <- prepared data <- arm
        overrides <- seed, length, schedule fractions and output paths."""
        layers = [self.overrides]
        if self.data is not None and data_dir is not None:
            layers.append({"model": {"vocab_size": self.data.vocab_size},
                           "data": {"paths": [os.path.join(data_dir, "train")],
                                    "valid_paths": [os.path.join(data_dir, "valid")],
                                    "tokenizer": os.path.join(data_dir, "tokenizer.model")}})
        layers.append(self.arm(run.arm).overrides)
        last = {"train": {"seed": run.seed, "steps": run.steps, "out_dir": out_dir, "stop_at_step": 0},
                "data": {"cache_dir": os.path.join(out_dir, "index-cache")},   # one index build per run
                "checkpoint": {"resume": "auto"}}
        if self.warmup_fraction > 0:
            last["optim"] = {"warmup_steps": round(self.warmup_fraction * run.steps)}
        if self.qat_start_fraction > 0:
            last["qat"] = {"start_step": round(self.qat_start_fraction * run.steps)}
        layers.append(last)
        return load_config(self.base, [arg for layer in layers for arg in flatten(layer)])


@dataclass(frozen=True)
class Run:
    """One training run of the plan and the steps at which it is evaluated."""
    id: str                          # arms/<id>/result.json
    arm: str
    seed: int
    steps: int
    points: tuple[int, ...]


def flatten(overrides: dict, prefix: str = "") -> list[str]:
    """``{"qat": {"enabled": False}, "optim.lr": 1e-3}`` -> the pretrain.train command-line overrides
    ``["--qat.enabled", "false", "--optim.lr", "0.001"]`` (values as JSON, which YAML reads back)."""
    args = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            args += flatten(value, f"{name}.")
        else:
            args += [f"--{name}", json.dumps(value)]
    return args


def _check(plan: Plan) -> None:
    if not os.path.isfile(plan.base):
        raise ConfigError(f"base config {plan.base!r} not found (paths are relative to the working directory)")
    names = [a.name for a in plan.arms]
    if not names:
        raise ConfigError("the plan has no arms")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"arm {dup[0]!r} appears twice")
    for arm in plan.arms:
        if not RUN_ID.match(arm.name) or "-seed" in arm.name:
            raise ConfigError(f"arm name {arm.name!r}: use letters, digits, '.', '_' and '-' (and no '-seed')")
        if not isinstance(arm.overrides, dict):
            raise ConfigError(f"arm {arm.name}: overrides must be a mapping, got {arm.overrides!r}")
    if not isinstance(plan.overrides, dict):
        raise ConfigError(f"overrides must be a mapping, got {plan.overrides!r}")
    if plan.baseline not in names:
        raise ConfigError(f"baseline arm {plan.baseline!r} is not among the arms ({', '.join(names)})")
    def check_fractions(fractions, where):
        if not fractions or any(not 0 < f <= 1 for f in fractions):
            raise ConfigError(f"{where}fractions must lie in (0, 1], got {fractions}")

    check_fractions(plan.fractions, "")
    for arm in plan.arms:
        if arm.fractions is not None:
            check_fractions(arm.fractions, f"arm {arm.name}: ")
        for length in (arm.lengths if arm.lengths is not None else plan.lengths):
            if length < 1:
                raise ConfigError(f"arm {arm.name}: run lengths must be >= 1 step, got {length}")
    if not 0 <= plan.warmup_fraction < 1 or not 0 <= plan.qat_start_fraction < 1:
        raise ConfigError("warmup_fraction and qat_start_fraction must lie in [0, 1)")
    if not plan.posttrain:
        raise ConfigError("the plan has no posttrain specs")
    spec_names = [s.name for s in plan.posttrain]
    for spec in plan.posttrain:
        if spec_names.count(spec.name) > 1 or not RUN_ID.match(spec.name):
            raise ConfigError(f"posttrain name {spec.name!r} must be unique and a plain file name")
        for name in spec.configs:
            try:
                parse_config(name)
            except ValueError as e:
                raise ConfigError(f"posttrain {spec.name}: {e}") from None
        if spec.points not in ("all", "final"):
            raise ConfigError(f"posttrain {spec.name}: points must be all or final, got {spec.points!r}")
        unknown = sorted(set(spec.arms) - set(names))
        if unknown:
            raise ConfigError(f"posttrain {spec.name}: unknown arm {unknown[0]!r}")
        try:
            QuantSpec(spec.method, spec.bits, spec.group_size).validate()
        except ValueError as e:
            raise ConfigError(f"posttrain {spec.name}: {e}") from None
    if plan.gpus_per_run < 1:
        raise ConfigError(f"gpus_per_run must be >= 1, got {plan.gpus_per_run}")


def load_plan(path: str, corpus: str | None = None) -> Plan:
    """Read and check a plan; ``corpus`` replaces data.corpus. Raises ConfigError naming the problem."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read the plan: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    plan = dataclass_from_dict(Plan, raw)
    if corpus is not None:
        if plan.data is None:
            raise ConfigError(f"--corpus given, but {path} has no data: section")
        plan.data.corpus = corpus
    _check(plan)
    for run in plan.runs():            # every run's training config, checked as pretrain.train would
        try:
            validate(plan.run_config(run, "runs/check", "data"), plan.gpus_per_run)
        except ConfigError as e:
            raise ConfigError(f"run {run.id}: {e}") from None
    return plan
