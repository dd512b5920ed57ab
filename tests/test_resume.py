"""Exact resume: 2N steps straight and N steps + stop + resume + N steps give bitwise-identical
losses (fp32, CPU), through the real entry point under torchrun, for TP=2 and PP=2 with QAT and
kurtosis on; plus the resume choices (auto / path / none) and compatibility checks."""
import json
import os

import pytest

from tests.data_utils import finish, losses, reseal, single, tiny_data, torchrun, train_args

N = 3


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _run(data, out_dir, *extra, nprocs=2):
    code, log = finish(torchrun(nprocs, train_args(data, str(out_dir), "--train.steps", str(2 * N),
                                                   "--train.log_interval", "1", *extra)))
    assert code == 0, log
    return log


@pytest.mark.parametrize("layout", [["--parallel.tensor", "2"], ["--parallel.pipeline", "2"]], ids=["tp2", "pp2"])
def test_stop_and_resume_is_bitwise_exact(data, tmp_path, layout):
    extra = [*layout, "--model.dropout", "0.1", "--kurtosis.lambda", "0.01"]   # dropout: RNG streams matter
    _run(data, tmp_path / "straight", *extra)
    _run(data, tmp_path / "split", *extra, "--train.stop_at_step", str(N))
    first = losses(tmp_path / "split")
    assert sorted(first) == list(range(1, N + 1))
    log = _run(data, tmp_path / "split", *extra)
    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / f'step{N:08d}'}" in log
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 2 * N + 1))
    assert split == straight                        # float equality of every step's loss
    assert len(set(straight.values())) == 2 * N      # and the steps really differ


def test_mismatched_config_or_tokenizer_is_refused(data, tmp_path):
    _run(data, tmp_path, "--train.stop_at_step", "1")
    ckpt = tmp_path / "checkpoints" / "step00000001"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["iteration"] == 1 and meta["tensor_parallel"] == 1 and meta["tp_layout"]

    code, log = finish(single(train_args(data, str(tmp_path), "--model.hidden_size", "64")))
    assert code == 2 and "cannot resume from" in log and "model.hidden_size: checkpoint 32, config 64" in log, log

    code, log = finish(single(train_args(data, str(tmp_path), "--train.steps", "99")))
    assert code == 2 and "train.steps x train.global_batch_size" in log and "data order would change" in log, log

    code, log = finish(torchrun(2, train_args(data, str(tmp_path), "--parallel.tensor", "2")))
    assert code != 0 and "exitcode  : 2" in log, log
    assert ("tensor-parallel size (parallel.tensor): checkpoint 1, this run 2\n  data-parallel size (world size / "
            "(parallel.tensor x parallel.pipeline)): checkpoint 2, this run 1\n") in log, log
    assert ("\n  (a checkpoint of another parallel layout resumes only with --checkpoint.reshard true, which re-splits "
            "its model and optimizer state)\n") in log, log

    meta["tokenizer_sha256"] = "0" * 64                 # as if trained with another tokenizer
    (ckpt / "meta.json").write_text(json.dumps(meta))
    reseal(ckpt)
    code, log = finish(single(train_args(data, str(tmp_path))))
    assert code == 2 and f"tokenizer: checkpoint sha256 {'0' * 64}" in log, log

    code, log = finish(single(train_args(data, str(tmp_path), "--resume", str(tmp_path / "nowhere"))))
    assert code == 2 and "does not exist" in log, log
