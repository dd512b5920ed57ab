"""The post-training command lines refuse a checkpoint they cannot use as pretrain.train does: one
line ``checkpoint error: ...`` on stderr, exit 2, no traceback (also under torchrun), for a path that
does not exist, a directory without a checkpoint, an incomplete or damaged checkpoint, and quantized
weights that are missing or were made from another model."""
import shutil
import subprocess
import sys

import pytest

from tests.data_utils import ENV, ROOT, finish, single, tiny_data, torchrun, train_args

CLIS = ("quant.quantize", "quant.evaluate", "quant.analyze")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained tiny runs: 'a' (2 blocks) with its RTN W4 weights, and 'b' (1 block)."""
    data = tiny_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("cli")
    for name, layers in (("a", "2"), ("b", "1")):
        code, log = finish(single(train_args(data, str(root / name), "--train.steps", "2",
                                             "--model.num_layers", layers)))
        assert code == 0, log
    code, out, err = cli("quant.quantize", "--checkpoint", str(root / "a"), "--output", str(root / "a-w4"),
                         "--method", "rtn")
    assert code == 0, out + err
    return root


def cli(module, *args):
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def refused(module, checkpoint, tmp_path):
    args = {"quant.quantize": ["--output", str(tmp_path / "w4"), "--method", "rtn"],
            "quant.evaluate": ["--tasks", "--ppl-windows", "1"],
            "quant.analyze": ["--output", str(tmp_path / "analysis")]}[module]
    code, out, err = cli(module, "--checkpoint", str(checkpoint), *args)
    assert code == 2 and "Traceback" not in out + err, out + err
    return err.splitlines()


def step_dir(run):
    return run / "checkpoints" / "step00000002"


@pytest.mark.parametrize("module", CLIS)
def test_a_path_without_a_checkpoint_is_refused(runs, tmp_path, module):
    nowhere = tmp_path / "nowhere"
    assert refused(module, nowhere, tmp_path) == [f"checkpoint error: checkpoint {nowhere} does not exist"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(module, empty, tmp_path) == [
        f"checkpoint error: no complete checkpoint under {empty} (looked in {empty / 'checkpoints'} and {empty})"]


@pytest.mark.parametrize("module", CLIS)
def test_an_incomplete_checkpoint_is_refused(runs, tmp_path, module):
    torn = tmp_path / "step00000002"
    shutil.copytree(step_dir(runs / "a"), torn)
    (torn / "COMPLETE").unlink()
    assert refused(module, torn, tmp_path) == [
        f"checkpoint error: checkpoint {torn} is incomplete (no COMPLETE marker): refusing to load it"]


@pytest.mark.parametrize("module", CLIS)
def test_a_damaged_checkpoint_is_refused(runs, tmp_path, module):
    run = tmp_path / "run"
    shutil.copytree(runs / "a", run)
    shard = step_dir(run) / "mp_rank_00_model_states.pt"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert refused(module, run, tmp_path) == [f"checkpoint error: checkpoint {step_dir(run)} does not verify: "
                                              f"mp_rank_00_model_states.pt does not match its digest (corrupted)"]


def test_quantized_weights_of_another_model_or_none_are_refused(runs, tmp_path):
    code, out, err = cli("quant.evaluate", "--checkpoint", str(runs / "b"), "--quantized", str(runs / "a-w4"),
                         "--tasks")
    assert code == 2 and "Traceback" not in out + err, out + err
    assert err.splitlines() == [f"checkpoint error: {runs / 'a-w4'} was quantized from another model than "
                                f"{step_dir(runs / 'b')} (model.num_layers: 2 there, 1 here)"]
    code, out, err = cli("quant.evaluate", "--checkpoint", str(runs / "a"), "--quantized", str(tmp_path), "--tasks")
    assert code == 2 and err.splitlines() == [
        f"checkpoint error: {tmp_path} holds no model.safetensors; write it with python -m quant.quantize"], out + err


def test_a_missing_shard_under_torchrun_is_one_line_per_rank(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "a", run)
    (step_dir(run) / "mp_rank_00_model_states.pt").unlink()
    code, log = finish(torchrun(2, ["--checkpoint", str(run), "--output", str(tmp_path / "w4"), "--method", "rtn"],
                                module="quant.quantize", env=ENV))
    line = f"checkpoint error: checkpoint {step_dir(run)} does not verify: mp_rank_00_model_states.pt is missing"
    assert code != 0 and "exitcode  : 2" in log and log.count(line) == 2, log
    assert "[rank0]" not in log and "[rank1]" not in log, log


def test_the_old_cli_name_points_to_the_new_one():
    code, out, err = cli("quant.gptq", "--checkpoint", "runs/demo")
    assert code == 1 and err.strip().splitlines() == [
        "python -m quant.gptq: the quantization command is python -m quant.quantize (quant.gptq is the algorithm)"]
