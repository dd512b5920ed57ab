"""End to end on CPU through the command lines: train tiny with QAT off and on, quantize with
GPTQ, check the saved codes round-trip, evaluate all four configurations, analyze side by side."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["data/demo/wikipedia.jsonl.xz", "data/demo/gutenberg.jsonl.xz"]
SMALL = ["--model.num_layers", "2", "--model.seq_length", "64", "--train.steps", "6",
         "--train.eval_interval", "0", "--train.log_interval", "3", "--checkpoint.interval", "0"]


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained runs sharing one tokenizer: {'qat': dir, 'noqat': dir}."""
    root = tmp_path_factory.mktemp("posttrain")
    data = root / "data"
    cli("data_prep.train_tokenizer", "--input", *DEMO, "--vocab-size", "1024", "--model-type", "bpe",
        "--output", str(data / "tokenizer"))
    cli("data_prep.tokenize", "--input", *DEMO, "--tokenizer", str(data / "tokenizer.model"),
        "--output-prefix", str(data / "train"), "--workers", "1", "--append-eod")
    out = {}
    for name, qat in (("qat", "true"), ("noqat", "false")):
        out[name] = str(root / name)
        cli("pretrain.train", "--config", "configs/tiny.yaml", "--train.out_dir", out[name],
            "--data.paths", f"[{data / 'train'}]", "--data.valid_paths", "[]",
            "--data.tokenizer", str(data / "tokenizer.model"), "--model.vocab_size", "1024",
            "--qat.enabled", qat, "--kurtosis.enabled", qat, *SMALL)
    return out


def requantize(run_dir, nsamples, seed):
    """The same GPTQ in-process, to compare with what the command line saved."""
    from data_prep.tokenizer import load_tokenizer
    from pretrain.parallel_dims import ParallelConfig, init_distributed
    from quant.corpora import calibration_windows
    from quant.quantize import QuantSpec, quantize_model
    from pretrain.reshard import load_checkpoint
    from quant.load import model_from_checkpoint

    init_distributed(ParallelConfig())
    ckpt = load_checkpoint(run_dir)
    windows = calibration_windows(load_tokenizer(ckpt.config.data.tokenizer), ckpt.config.model.seq_length,
                                  nsamples, seed)
    results, _ = quantize_model(model_from_checkpoint(ckpt), windows, QuantSpec("gptq", 4, 32, act_order=True))
    return {name: (q.codes, q.scales, q.dequantize()) for name, q in results.items()}


def test_train_quantize_evaluate_analyze(runs, tmp_path):
    from quant import quantize

    for name, run in runs.items():
        qdir = str(tmp_path / f"{name}-w4")
        log = cli("quant.quantize", "--checkpoint", run, "--output", qdir, "--method", "gptq", "--bits", "4",
                  "--group-size", "32", "--act-order", "--nsamples", "8", "--seed", "3")
        assert "hessian+solve seconds" in log and "total seconds" in log
        layers, clips, manifest = quantize.load(qdir)
        assert manifest["info"]["config"]["qat"]["enabled"] == (name == "qat")
        assert manifest["info"]["calibration"]["nsamples"] == 8
        assert len(clips) == (4 * 2 if name == "qat" else 0)
        with open(os.path.join(qdir, "manifest.json")) as f:
            assert json.load(f) == manifest
        again = run_distributed(requantize, 1, run, 8, 3)[0]
        assert set(again) == set(layers)
        for layer, (codes, scales, w_hat) in again.items():
            assert torch.equal(layers[layer].codes, codes) and torch.equal(layers[layer].scales, scales)
            assert torch.equal(layers[layer].dequantize(), w_hat)

        report_path = str(tmp_path / f"{name}-eval.json")
        table = cli("quant.evaluate", "--checkpoint", run, "--quantized", qdir, "--tasks", "piqa",
                    "lambada_openai", "--limit", "4", "--ppl-windows", "3", "--output", report_path)
        with open(report_path) as f:
            report = json.load(f)
        assert list(report["table"]) == ["W16A16", "W8A8", "W4A16", "W4A4"]
        assert "checkpoint codes" in report["configs"]["W4A4"]["weights"]
        assert report["configs"]["W4A4"]["acts"] == ("qat clip" if name == "qat" else "per-token asym 4-bit")
        assert report["configs"]["W8A8"]["acts"] == ("qat clip" if name == "qat" else "int8 GEMM")
        for cfg, cells in report["table"].items():
            assert set(cells) == {"wikitext2_ppl", "c4_ppl", "piqa_acc", "lambada_openai_acc"}
            for metric in ("wikitext2_ppl", "c4_ppl"):
                base = report["table"]["W16A16"][metric]["value"]
                assert math.isfinite(cells[metric]["value"]) and cells[metric]["value"] > 1
                assert cells[metric]["change_pct"] == pytest.approx(100 * (cells[metric]["value"] / base - 1))
            assert cfg in table

    out = str(tmp_path / "analysis")
    cli("quant.analyze", "--checkpoint", runs["qat"], "--compare", runs["noqat"], "--output", out, "--nsamples", "4")
    with open(os.path.join(out, "analysis.json")) as f:
        analysis = json.load(f)
    assert list(analysis) == ["qat", "noqat"]
    stats = analysis["qat"]["linears"]["blocks.0.mlp.fc1"]
    assert {"kurtosis", "outliers_6x", "rmse_a8", "rmse_a4", "rmse_a4_clip", "token_std", "spectral_norm"} <= set(stats)
    assert stats["rmse_a8"] < stats["rmse_a4"]
    assert "rmse_a4_clip" not in analysis["noqat"]["linears"]["blocks.0.mlp.fc1"]
    assert all(os.path.getsize(os.path.join(out, f"{m}.png")) > 0 for m in ("kurtosis", "spectral_norm"))
