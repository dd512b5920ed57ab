"""Bad configuration fails before any work, with a message that names the problem; every key is
documented in --help and the README, generated from the config dataclasses."""
import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from pretrain.config import Config, ConfigError, load_config, parse_overrides, validate, yaml_key
from pretrain.config_reference import README, markdown, readme_reference
from pretrain.train import main


def _error(capsys, monkeypatch, world: int, *overrides: str) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["--config", "configs/tiny.yaml", *overrides]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("world, overrides, message", [
    (1, ["--model.num_heads", "3"], "model.num_heads=3 does not divide model.hidden_size=128"),
    (2, ["--parallel.tensor", "2", "--model.num_heads", "3", "--model.hidden_size", "96"],
     "tensor parallel size 2 does not divide model.num_heads=3"),
    (3, ["--parallel.tensor", "2"], "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1"),
    (1, ["--train.bf16", "true", "--train.fp16", "true"], "train.bf16 and train.fp16 are both true"),
    (1, ["--train.steps", "ten"], "train.steps: expected int, got 'ten'"),
    (2, ["--train.global_batch_size", "10", "--train.micro_batch_size", "4"],
     "train.global_batch_size=10 is not a multiple of train.micro_batch_size x data-parallel size = 4 x 2"),
    (1, ["--qat.bits", "1"], "qat.bits must be in 2..8"),
    (1, ["--kurtosis.reduce", "max"], "kurtosis.reduce must be 'mean' or 'sum'"),
    (2, ["--parallel.tensor", "2", "--train.compile", "true"], "train.compile needs parallel.tensor=1, got 2"),
    (1, ["--train.compile", "true", "--train.activation_checkpointing", "full"],
     "train.compile is not yet tested with activation checkpointing"),
    (1, ["--train.compile", "true", "--train.compile_mode", "fast"], "train.compile_mode must be one of default, "
     "reduce-overhead, max-autotune-no-cudagraphs, max-autotune, got 'fast'"),
    (1, ["--train.compile_mode", "reduce-overhead"], "train.compile_mode=reduce-overhead needs train.compile: true"),
])
def test_bad_config_is_refused_before_any_work(capsys, monkeypatch, world, overrides, message):
    assert message in _error(capsys, monkeypatch, world, *overrides)


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr", "unknown config key optim.'lrr' (did you mean optim.lr?); known keys of optim: beta1, beta2, "
                    "decay_steps, eps, grad_clip, lr, min_lr, warmup_steps, weight_decay"),
    ("--trian.steps", "unknown config key 'trian' (did you mean train?); known keys: checkpoint, data, kurtosis, "
                      "model, optim, parallel, qat, train"),
    ("--kurtosis.lamda", "unknown config key kurtosis.'lamda' (did you mean kurtosis.lambda?); known keys of "
                         "kurtosis: enabled, eps, lambda, reduce, sites"),
    ("--optim.momentum", "unknown config key optim.'momentum'; known keys of optim: beta1, beta2, decay_steps, eps, "
                         "grad_clip, lr, min_lr, warmup_steps, weight_decay"),
])
def test_unknown_key_or_section_names_the_closest_known_one(capsys, monkeypatch, override, message):
    assert _error(capsys, monkeypatch, 1, override, "1") == f"config error: {message}\n"


def test_unknown_yaml_key_names_the_closest_known_one(capsys, monkeypatch, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("qat:\n  enabeld: true\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--config", str(typo)]) == 2
    assert capsys.readouterr().err == ("config error: unknown config key qat.'enabeld' (did you mean qat.enabled?); "
                                       "known keys of qat: bits, enabled, init, init_value, layers, recompute_inputs, start_step\n")


def test_yaml_syntax_errors_are_one_line_naming_the_file_or_override(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [64\ntrain:\n  steps: 3\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--config", str(bad)]) == 2
    assert capsys.readouterr().err == (f"config error: {bad}: invalid YAML at line 3, column 6: expected ',' or ']', "
                                       "but got ':' (while parsing a flow sequence)\n")
    assert _error(capsys, monkeypatch, 1, "--qat.layers", "[fc1") == (
        "config error: --qat.layers '[fc1': invalid YAML at line 1, column 5: expected ',' or ']', "
        "but got '<stream end>' (while parsing a flow sequence)\n")


def test_overrides_typed_and_nested():
    cfg = load_config("configs/tiny.yaml", ["--train.steps=7", "--kurtosis.lambda", "1e-3",
                                            "--qat.layers", "[fc2]", "--model.bias", "false"])
    assert (cfg.train.steps, cfg.kurtosis.lambda_, cfg.qat.layers, cfg.model.bias) == (7, 1e-3, ["fc2"], False)
    assert parse_overrides(["--a.b.c", "1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="missing value for --train.steps"):
        parse_overrides(["--train.steps"])


def test_every_shipped_config_is_valid():
    for name, world in (("tiny", 1), ("125m", 8), ("350m", 8), ("1b", 8)):
        validate(load_config(f"configs/{name}.yaml"), world)


def test_help_lists_every_key_of_every_section_without_importing_torch():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "pretrain.train", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in run.stderr.splitlines()}
    assert not imported & {"torch", "megatron", "deepspeed", "triton"}     # what made --help take seconds
    assert run.stdout.startswith("usage: python -m pretrain.train [-h] [--config CONFIG] [--resume RESUME]\n")
    blocks = {lines[0]: lines[1:] for lines in (b.splitlines() for b in run.stdout.strip().split("\n\n"))}
    for section, cls in typing.get_type_hints(Config).items():
        rows = blocks[f"{section} ({cls.__module__}.{cls.__qualname__}):"]
        assert [row.split(":")[0].strip() for row in rows] == [yaml_key(f.name) for f in dataclasses.fields(cls)]
        assert all(re.fullmatch(r"  \w+: .+ = .+?  +\S.*", row) for row in rows), rows    # each with its doc
    optim, data = blocks["optim (pretrain.config.OptimConfig):"], blocks["data (data_prep.config.DataConfig):"]
    assert optim[0] == "  lr: float = 0.0003         peak learning rate (clip values use it too)"
    assert data[0].startswith("  paths: list[str] = required           dataset prefixes written by")
    assert blocks["kurtosis (qat.config.KurtosisConfig):"][1].startswith("  lambda: float = 0.001  ")


def test_readme_config_reference_is_the_generated_one():
    with open(README) as f:
        assert readme_reference(f.read()) == markdown(), "run python -m pretrain.config_reference"
