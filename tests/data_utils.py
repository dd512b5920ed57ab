"""A tiny real dataset (``pretrain.tiny_run``'s, built once per pytest session), and helpers that
run ``python -m pretrain.train`` for real under torchrun."""
import json
import os
import subprocess
import sys

from pretrain.tiny_run import ENV, ROOT, build_data, train_args  # noqa: F401  (train_args: for the tests)
from tests.dist_utils import free_port


def tiny_data(tmp_path_factory) -> str:
    """Directory with tokenizer.model and train.{bin,idx,json}; built by the first caller."""
    return build_data(str(tmp_path_factory.getbasetemp() / "tiny_data"))


def torchrun(nprocs: int, args: list[str], module: str = "pretrain.train", env: dict = {}) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node N -m MODULE ARGS`` (stdout+stderr piped)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs), "--master-port",
           str(free_port()), "-m", module, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def single(args: list[str], module: str = "pretrain.train", env: dict = {}) -> subprocess.Popen:
    """``python -m MODULE ARGS`` as a world of one (its exit code is the trainer's own)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env={**ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def losses(out_dir: str) -> dict[int, float]:
    """step -> logged training loss, from the run's metrics.jsonl (the last record of each step)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def reseal(step_dir) -> None:
    """Record a hand-edited checkpoint's files in its COMPLETE again, as if it had been saved so
    (tests that tamper on purpose, past the integrity check)."""
    from pretrain.checkpoint import COMPLETE, _digest, _files
    path = os.path.join(step_dir, COMPLETE)
    with open(path) as f:
        marker = json.load(f)
    marker["files"] = {n: _digest(os.path.join(step_dir, n)) for n in _files(str(step_dir))}
    with open(path, "w") as f:
        json.dump(marker, f)
