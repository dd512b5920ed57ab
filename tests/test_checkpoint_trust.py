"""Checkpoints you can trust, for real processes: a finished run relaunched rewrites nothing;
truncated or corrupted shards are detected and --resume auto falls back to the previous checkpoint;
a planted pickle in any loaded file runs nothing; a second job on a run directory is refused; the
checkpoint a non-finite streak's abort names resumes and trains on with a lower learning rate.

Run as ``python -m tests.test_checkpoint_trust ARGS``, this module is ``pretrain.train`` except that
the LM head's output is NaN on the steps after $NAN_AFTER_STEP whose learning rate is above
$NAN_ABOVE_LR: a divergence that a lower learning rate avoids.
"""
import json
import math
import os
import re
import shutil
import signal
import time

import pytest
import torch

from pretrain.checkpoint import CheckpointError, load_file
from tests.data_utils import finish, reseal, single, tiny_data, train_args


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _files(step_dir):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(step_dir.iterdir())}


def test_relaunching_a_finished_run_rewrites_nothing(data, tmp_path):
    code, log = finish(single(train_args(data, str(tmp_path), "--train.steps", "3")))
    assert code == 0, log
    step = tmp_path / "checkpoints" / "step00000003"
    before = _files(step)
    code, log = finish(single(train_args(data, str(tmp_path), "--train.steps", "3")))
    assert code == 0 and "already finished at step 3 (train.steps 3); nothing to do" in log, log
    assert "saved checkpoint" not in log and _files(step) == before


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory):
    """A run of 6 steps stopped at step 4 with checkpoints at steps 2 and 4, trained once; the
    tests damage their own copies (``_two_checkpoints``)."""
    out = tmp_path_factory.mktemp("stopped-run")
    code, log = finish(single(train_args(data, str(out), "--train.steps", "6", "--checkpoint.interval", "2",
                                         "--train.stop_at_step", "4")))
    assert code == 0, log
    return out


def _two_checkpoints(stopped_run, out):
    """A copy of ``stopped_run`` in ``out`` (training there resumes from it); its two checkpoints."""
    shutil.copytree(stopped_run, out, dirs_exist_ok=True)
    return out / "checkpoints" / "step00000002", out / "checkpoints" / "step00000004"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_is_skipped_under_auto_and_refused_by_path(data, stopped_run, tmp_path, damage):
    older, newest = _two_checkpoints(stopped_run, tmp_path)
    shard = next(newest.glob("*optim_states.pt") if damage == "truncate" else newest.glob("mp_rank_*model_states.pt"))
    blob = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(blob[:len(blob) // 5])
        why = f"{shard.name} has {len(blob) // 5} bytes, {len(blob)} were written"
    else:
        mid = len(blob) // 2
        shard.write_bytes(blob[:mid] + os.urandom(4096) + blob[mid + 4096:])
        why = f"{shard.name} does not match its digest (corrupted)"
    code, log = finish(single(train_args(data, str(tmp_path), "--train.steps", "6", "--resume", str(newest))))
    assert code == 2 and f"checkpoint error: checkpoint {newest} does not verify: {why}" in log, log
    from pretrain.reshard import load_checkpoint
    if damage == "garbage":                                        # post-training reads the model files
        with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {newest} does not verify: {why}")):
            load_checkpoint(str(newest))
    code, log = finish(single(train_args(data, str(tmp_path), "--train.steps", "6")))
    assert code == 0, log
    assert f"skipping checkpoint {newest}: {why}" in log and f"resumed from {older} at step 2" in log
    assert (newest.parent / "damaged-step00000004" / shard.name).read_bytes() != blob   # kept, out of the way
    assert (newest.parent / "step00000006" / "COMPLETE").exists()


class _Planted:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["rng_rank00000.pt", "mp_rank_00_model_states.pt", "optim_states.pt"])
def test_a_planted_pickle_runs_nothing(data, stopped_run, tmp_path, victim):
    _, newest = _two_checkpoints(stopped_run, tmp_path)
    marker = tmp_path / "PWNED"
    target = next(p for p in newest.iterdir() if p.name.endswith(victim))
    state = torch.load(target, weights_only=False)                  # our own file: safe to read here
    state = {"planted": _Planted(marker), **(state if isinstance(state, dict) else {})}
    torch.save(state, target)
    reseal(newest)                                                  # the digests match: only the loader stands
    code, log = finish(single(train_args(data, str(tmp_path), "--train.steps", "6", "--resume", str(newest))))
    assert code == 2 and f"checkpoint error: refusing to load {target}" in log, log
    assert not marker.exists()
    if victim.startswith("mp_rank"):
        from pretrain.reshard import load_checkpoint
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_checkpoint(str(newest))
        assert not marker.exists()


def test_second_job_on_a_run_directory_is_refused(data, tmp_path):
    slow = ["--train.steps", "100000", "--optim.lr", "1e-4", "--optim.min_lr", "1e-5"]   # stays finite for minutes
    first = single(train_args(data, str(tmp_path), *slow))
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[0][-3000:]
    code, log = finish(single(train_args(data, str(tmp_path), *slow)))
    assert code == 2 and f"run error: run directory {tmp_path} is in use by another training job" in log, log
    assert f'"pid": {first.pid}' in log
    first.send_signal(signal.SIGKILL)                               # dies holding the lock
    first.wait()
    code, log = finish(single(train_args(data, str(tmp_path), *slow, "--train.stop_at_step", "1",
                                         "--checkpoint.resume", "none")))
    assert code == 0 and "ended without releasing it; taking over" in log, log


def test_nonfinite_abort_names_a_checkpoint_that_resumes_with_a_lower_lr(data, tmp_path):
    """Steps 6-8 diverge at the configured lr (3e-3 peak): the abort names step 4, the last
    checkpoint before the streak (the one due at step 6 is not written), and that checkpoint
    resumed at lr 5e-4 trains to the end with finite losses and weights."""
    args = train_args(data, str(tmp_path), "--train.steps", "12", "--checkpoint.interval", "2",
                      "--train.max_nonfinite_steps", "3")
    diverges = {"NAN_AFTER_STEP": "5", "NAN_ABOVE_LR": "1e-3"}
    code, log = finish(single(args, module="tests.test_checkpoint_trust", env=diverges))
    root = tmp_path / "checkpoints"
    before = root / "step00000004"
    assert code == 1, log
    assert (f"training aborted: 3 steps in a row (up to step 8) had a non-finite loss or gradient (train.max_nonfinite_steps=3): "
            f"aborting. The last checkpoint, saved before the streak: {before}; resume from it (--resume PATH) "
            f"with a lower optim.lr") in log, log
    assert f"step 6: not saving a checkpoint, the step's loss was non-finite (the last one saved: {before})" in log
    assert sorted(p.name for p in root.glob("step*")) == ["step00000002", "step00000004"]
    assert (root / "latest").read_text() == "step00000004"
    named = re.search(r"saved before the streak: (\S+);", log).group(1)
    with open(tmp_path / "metrics.jsonl") as f:
        aborted = len(f.readlines())

    code, log = finish(single([*args, "--resume", named, "--optim.lr", "5e-4"], module="tests.test_checkpoint_trust",
                              env=diverges))
    assert code == 0, log
    assert f"resumed from {named} at step 4 (16 samples consumed)" in log and "non-finite" not in log, log
    with open(tmp_path / "metrics.jsonl") as f:
        resumed = [json.loads(line) for line in f.readlines()[aborted:]]
    assert [r["step"] for r in resumed] == list(range(5, 13))
    assert all(math.isfinite(r["train/loss"]) and r["train/lr"] <= 5e-4 and r["train/skipped_steps"] == 0
               for r in resumed), resumed
    state = load_file(str(root / "step00000012" / "mp_rank_00_model_states.pt"))["module"]
    weights = [t for t in state.values() if isinstance(t, torch.Tensor)]     # megatron's _extra_state is None
    assert len(weights) > 40 and all(torch.isfinite(w).all() for w in weights)


if __name__ == "__main__":
    import sys

    from model.gpt import Head
    from pretrain import train, trainer

    after, above = int(os.environ["NAN_AFTER_STEP"]), float(os.environ["NAN_ABOVE_LR"])
    set_lr, head_forward, diverged = trainer.set_lr, Head.forward, [False]

    def _set_lr(engine, step, cfg):   # Trainer.train_step sets the lr of step + 1 before its forwards
        set_lr(engine, step, cfg)
        diverged[0] = step >= after and engine.get_lr()[0] > above

    def _forward(self, x):
        out = head_forward(self, x)
        return out * float("nan") if diverged[0] else out

    trainer.set_lr, Head.forward = _set_lr, _forward
    sys.exit(train.main())
