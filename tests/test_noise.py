"""Library noise is silenced at its source (quiet.py) and nothing else is: the exact known lines go,
near misses stay; the entry points' output on the tiny config, with Python's warnings shown as
they are by default, holds the project's own lines and none of the library noise."""
import subprocess
import sys
import textwrap

import pytest

from pretrain.tiny_run import DEMO, ENV, ROOT, train_args
from tests.dist_utils import free_port

LOUD = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}   # warnings as a user sees them
NOISE = ("Transformer Engine and Apex are not installed", "found in sys.modules after import of package",
         "GPTDataset", "_IndexReader", "total number of", "untested optimizer", "Overwriting default num_fewshot",
         "Setting accelerator to CPU", "gcc ", "built successfully", "Megatron-FSDP", "Building contexts for",
         "Running loglikelihood requests", "Setting random seed", "Selected tasks", "Generating validation split",
         "warnings.warn(")


def test_quiet_drops_the_known_lines_and_nothing_else():
    script = textwrap.dedent("""
        import logging, sys, warnings
        import quiet
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stdout)
        te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
        warnings.warn_explicit(te, UserWarning, "a.py", 1, module="megatron.core.optimizer")
        warnings.warn_explicit(te, UserWarning, "b.py", 2, module="pretrain.engine")
        warnings.warn_explicit("another megatron warning", UserWarning, "c.py", 3, module="megatron.core.optimizer")
        ds = logging.getLogger("DeepSpeed")
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        ds.warning("another DeepSpeed warning")
        for name in ("megatron.core.datasets.gpt_dataset", "lm_eval.evaluator", "compilers.C.base"):
            logging.getLogger(name).info("chatter")
            logging.getLogger(name).warning("a warning")
        logging.getLogger("pretrain").info("our own line")
        with quiet.without_known_prints():
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
            print("another print")
        try:
            with quiet.without_known_prints():
                print("printed before an error")
                raise RuntimeError
        except RuntimeError:
            pass
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=LOUD, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "DeepSpeed WARNING another DeepSpeed warning",
        "megatron.core.datasets.gpt_dataset WARNING a warning", "lm_eval.evaluator WARNING a warning",
        "compilers.C.base WARNING a warning", "pretrain INFO our own line", "another print", "printed before an error"]
    assert [line for line in done.stderr.splitlines() if "Warning" in line] == [
        "b.py:2: UserWarning: Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
        "c.py:3: UserWarning: another megatron warning"]


def run(*args, torchrun=0):
    """stdout + stderr of ``python -m ARGS`` (under torchrun with that many ranks), which must succeed."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), "--master-port", str(free_port())]
    done = subprocess.run([*launcher, "-m", *args], cwd=ROOT, env=LOUD, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_entry_points_print_no_library_noise(tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    logs = {"train_tokenizer": run("data_prep.train_tokenizer", "--input", DEMO, "--vocab-size", "512",
                                   "--model-type", "bpe", "--output", str(data / "tokenizer")),
            "tokenize": run("data_prep.tokenize", "--input", DEMO, "--tokenizer", str(data / "tokenizer.model"),
                            "--output-prefix", str(data / "train"), "--workers", "2", "--append-eod")}
    logs["train"] = run("pretrain.train", *train_args(str(data), str(run_dir), "--train.steps", "2",
                                                      "--data.valid_paths", f"[{data / 'train'}]"), torchrun=2)
    logs["gptq"] = run("quant.quantize", "--checkpoint", str(run_dir), "--output", str(tmp_path / "w4"), "--nsamples", "2")
    logs["evaluate"] = run("quant.evaluate", "--checkpoint", str(run_dir), "--quantized", str(tmp_path / "w4"),
                           "--configs", "W4A4", "--tasks", "piqa", "--limit", "2", "--ppl-windows", "2")
    logs["analyze"] = run("quant.analyze", "--checkpoint", str(run_dir), "--output", str(tmp_path / "analysis"),
                          "--nsamples", "2")
    own = {"train_tokenizer": "wrote ", "tokenize": "wrote ", "train": "final valid loss", "gptq": "block 2/2 quantized",
           "evaluate": "W4A4 ", "analyze": "analysis.json"}
    for name, log in logs.items():
        assert own[name] in log, log
        assert not [n for n in NOISE if n in log], f"{name}:\n{log}"
