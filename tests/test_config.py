"""Bad configuration fails before any work, with a message that names the problem."""
import pytest

from pretrain.config import ConfigError, load_config, parse_overrides, validate
from pretrain.train import main


def _error(capsys, monkeypatch, world: int, *overrides: str) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["--config", "configs/tiny.yaml", *overrides]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("world, overrides, message", [
    (1, ["--model.hidden_sizee", "64"], "unknown config key model.'hidden_sizee'"),
    (1, ["--trian.steps", "3"], "unknown config key 'trian'"),
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
])
def test_bad_config_is_refused_before_any_work(capsys, monkeypatch, world, overrides, message):
    assert message in _error(capsys, monkeypatch, world, *overrides)


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
