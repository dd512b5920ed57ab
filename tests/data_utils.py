"""A tiny real dataset (512-piece tokenizer, valid.jsonl.xz of the demo corpus, tokenized) built once
per pytest session, and helpers that run ``python -m pretrain.train`` for real under torchrun."""
import json
import os
import subprocess
import sys

from tests.dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo", "valid.jsonl.xz")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}


def tiny_data(tmp_path_factory) -> str:
    """Directory with tokenizer.model and train.{bin,idx,json}; built by the first caller."""
    out = tmp_path_factory.getbasetemp() / "tiny_data"
    if not (out / "train.json").exists():
        out.mkdir(exist_ok=True)
        run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, check=True,  # noqa: E731
                                           capture_output=True)
        run("data_prep.train_tokenizer", "--input", DEMO, "--vocab-size", "512", "--model-type", "bpe",
            "--output", str(out / "tokenizer"))
        run("data_prep.tokenize", "--input", DEMO, "--tokenizer", str(out / "tokenizer.model"),
            "--output-prefix", str(out / "train"), "--append-eod")
    return str(out)


def train_args(data: str, out_dir: str, *extra: str) -> list[str]:
    """pretrain.train arguments for a tiny model on the tiny dataset (no validation set)."""
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--train.out_dir", out_dir,
            "--data.paths", f"[{data}/train]", "--data.valid_paths", "null", "--data.split", "100,0,0",
            "--data.tokenizer", f"{data}/tokenizer.model", "--model.vocab_size", "512",
            "--model.hidden_size", "32", "--model.num_layers", "2", "--model.seq_length", "16",
            "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.log_interval", "1",
            "--train.eval_interval", "0", "--optim.warmup_steps", "2", *extra]


def torchrun(nprocs: int, args: list[str], module: str = "pretrain.train", env: dict = {}) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node N -m MODULE ARGS`` (stdout+stderr piped)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs), "--master-port",
           str(free_port()), "-m", module, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def single(args: list[str]) -> subprocess.Popen:
    """``python -m pretrain.train ARGS`` as a world of one (its exit code is the trainer's own)."""
    return subprocess.Popen([sys.executable, "-m", "pretrain.train", *args], cwd=ROOT, env=ENV,
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
