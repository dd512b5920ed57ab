"""The tiny real training run that tests and ``bench/faults.py`` start as real processes: a
512-piece tokenizer and token files built from the demo corpus's validation excerpt, and the
``pretrain.train`` arguments of a 2-layer model on them (configs/tiny.yaml, shrunk)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo", "valid.jsonl.xz")
# One intra-op thread per process (several ranks share a small CPU); library warnings out of logs.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}


def build_data(out: str) -> str:
    """``out`` with tokenizer.model and train.{bin,idx,json}, built unless train.json (written
    last) is there already."""
    if not os.path.exists(os.path.join(out, "train.json")):
        os.makedirs(out, exist_ok=True)
        run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, check=True,  # noqa: E731
                                           capture_output=True)
        run("data_prep.train_tokenizer", "--input", DEMO, "--vocab-size", "512", "--model-type", "bpe",
            "--output", os.path.join(out, "tokenizer"))
        run("data_prep.tokenize", "--input", DEMO, "--tokenizer", os.path.join(out, "tokenizer.model"),
            "--output-prefix", os.path.join(out, "train"), "--append-eod")
    return out


def train_args(data: str, out_dir: str, *extra: str) -> list[str]:
    """pretrain.train arguments for a tiny model on ``build_data``'s files (no validation set)."""
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--train.out_dir", out_dir,
            "--data.paths", f"[{data}/train]", "--data.valid_paths", "null", "--data.split", "100,0,0",
            "--data.tokenizer", f"{data}/tokenizer.model", "--model.vocab_size", "512",
            "--model.hidden_size", "32", "--model.num_layers", "2", "--model.seq_length", "16",
            "--train.micro_batch_size", "2", "--train.global_batch_size", "4", "--train.log_interval", "1",
            "--train.eval_interval", "0", "--optim.warmup_steps", "2", *extra]
