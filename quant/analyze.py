"""Quantizability metrics of a checkpoint (optionally two side by side): ``python -m quant.analyze``.

    python -m quant.analyze --checkpoint runs/qat --compare runs/baseline --output runs/analysis

Per linear input, on calibration windows of the C4 calibration slice, measured before the input is
quantized: a QAT model runs as trained (its learned clips quantize each input; without them its
activations are not the trained network's), other models on 16-bit activations:
kurtosis (mean over tokens of the per-token kurtosis over channels), outlier channels by the 6x
rule (mean |x| of the channel > 6 x the layer's mean |x|) and by the LLM.int8 rule (|x| > 6 in
>= 6 % of tokens in a layer; a dim counts when that holds in >= 25 % of the layers of its input
width), RMSE between x and its per-token asymmetric quantization at 8 and 4 bits (and on the
learned clip at the QAT width), mean per-token standard deviation, and the kurtosis of the
linear's output (what the kurtosis regularizer penalizes at the residual writers). Per block: standard deviation
of the norm gains and the spectral norm of each weight (power iteration). Writes analysis.json
and one PNG per metric, each with one line per checkpoint.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import json
import logging
import os
import sys
import time

import torch

from kernels import token_kurtosis
from quant.activations import fake_quant_per_token, fake_quant_static_clip

log = logging.getLogger("quant")
OUTLIER_FACTOR, INT8_THRESHOLD, INT8_TOKENS, INT8_LAYERS = 6.0, 6.0, 0.06, 0.25
PLOTS = ("kurtosis", "output_kurtosis", "outliers_6x", "rmse_a4", "rmse_a8", "token_std", "spectral_norm")


class InputStats:
    """Running sums over the tokens seen by one linear input [..., channels]."""

    def __init__(self, clip=None, clip_bits=None):
        self.clip, self.clip_bits = clip, clip_bits
        self.tokens = 0
        self.sums = {}

    def _add(self, key, value):
        self.sums[key] = self.sums.get(key, 0) + value

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self._add("abs", x.abs().sum(0).cpu())
        self._add("over6", (x.abs() > INT8_THRESHOLD).sum(0).cpu())
        self._add("kurtosis", token_kurtosis(x).sum().item())
        self._add("std", x.std(dim=1, unbiased=False).sum().item())
        for bits in (8, 4):
            self._add(f"se_a{bits}", (fake_quant_per_token(x, bits) - x).pow(2).mean(1).sum().item())
        if self.clip is not None:
            self._add("se_clip", (fake_quant_static_clip(x, self.clip, self.clip_bits) - x).pow(2).mean(1).sum().item())

    def add_output(self, y: torch.Tensor) -> None:
        self._add("output_kurtosis", token_kurtosis(y.detach().reshape(-1, y.shape[-1]).float()).sum().item())

    def result(self) -> dict:
        n = self.tokens
        channel_abs = self.sums["abs"] / n
        out = {"kurtosis": self.sums["kurtosis"] / n, "output_kurtosis": self.sums["output_kurtosis"] / n,
               "outliers_6x": int((channel_abs > OUTLIER_FACTOR * channel_abs.mean()).sum()),
               "int8_dims": torch.nonzero(self.sums["over6"] / n >= INT8_TOKENS).flatten().tolist(),
               "rmse_a8": (self.sums["se_a8"] / n) ** 0.5, "rmse_a4": (self.sums["se_a4"] / n) ** 0.5,
               "token_std": self.sums["std"] / n, "width": len(channel_abs)}
        if self.clip is not None:
            out[f"rmse_a{self.clip_bits}_clip"] = (self.sums["se_clip"] / n) ** 0.5
        return out


def llm_int8_dims(inputs: dict[str, dict]) -> dict[int, list[int]]:
    """Per input width: the dims flagged in >= 25 % of that width's layers (LLM.int8 rule)."""
    by_width: dict[int, list[list[int]]] = {}
    for stats in inputs.values():
        by_width.setdefault(stats["width"], []).append(stats["int8_dims"])
    result = {}
    for width, flagged in by_width.items():
        counts = torch.zeros(width)
        for dims in flagged:
            counts[dims] += 1
        result[width] = torch.nonzero(counts >= INT8_LAYERS * len(flagged)).flatten().tolist()
    return result


@torch.no_grad()
def spectral_norm(weight: torch.Tensor, iters: int = 100, seed: int = 0) -> float:
    """Largest singular value by power iteration on W^T W."""
    w = weight.detach().float()
    v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed)).to(w.device)
    for _ in range(iters):
        v = w.T @ (w @ v)
        v = v / v.norm().clamp(min=1e-30)
    return (w @ v).norm().item()


@torch.no_grad()
def analyze(model, windows: torch.Tensor, qat_bits=None, batch_size: int = 8) -> dict:
    """All metrics of a TP=1 GPT over calibration windows [n, seq]; QAT quantizers become
    evaluation quantizers of the same clips, so the hooks see each input before quantization."""
    from quant.convert import act_quantizer, block_linears

    device = next(model.parameters()).device
    stats, handles = {}, []
    for name, linear in block_linears(model):
        q = linear.input_quant
        clip = q.clip.detach().float() if q is not None else None
        stats[name] = InputStats(clip, qat_bits)
        linear.input_quant = act_quantizer(qat_bits, clip) if clip is not None else None
        handles.append(linear.register_forward_pre_hook(lambda m, args, s=stats[name]: s.add(args[0])))
        handles.append(linear.register_forward_hook(lambda m, args, y, s=stats[name]: s.add_output(y)))
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        model(windows[i:i + batch_size].to(device))
        done = min(i + batch_size, len(windows))
        rate = done / (time.perf_counter() - start)
        log.info(f"  analysis windows {done}/{len(windows)} | {rate:.1f} windows/s | ETA {(len(windows) - done) / rate:.0f} s")
    for h in handles:
        h.remove()
    inputs = {name: s.result() for name, s in stats.items()}
    for name, linear in block_linears(model):
        inputs[name]["spectral_norm"] = spectral_norm(linear.weight)
    blocks = {f"blocks.{i}": {"norm1_gain_std": b.norm1.weight.std().item(),
                              "norm2_gain_std": b.norm2.weight.std().item()}
              for i, b in enumerate(model.blocks)}
    return {"linears": inputs, "blocks": blocks, "llm_int8_dims": llm_int8_dims(inputs)}


def plot(results: dict[str, dict], output: str) -> list[str]:
    """One PNG per metric: value per linear, one line per checkpoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in PLOTS:
        fig, ax = plt.subplots(figsize=(10, 4))
        for label, res in results.items():
            names = list(res["linears"])
            ax.plot(range(len(names)), [res["linears"][n][metric] for n in names], marker="o", label=label)
        ax.set_xticks(range(len(names)), [n.removeprefix("blocks.") for n in names], rotation=90, fontsize=7)
        ax.set_ylabel(metric)
        if metric in ("kurtosis", "output_kurtosis"):
            ax.set_yscale("log")
        ax.set_title(f"{metric} per linear input")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(output, f"{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m quant.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    p.add_argument("--compare", help="a second checkpoint, analyzed side by side")
    p.add_argument("--output", default="analysis", help="directory for analysis.json and the PNGs")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


def _label(path: str, taken: dict) -> str:
    parts = [p for p in os.path.normpath(path).split(os.sep) if p and p != "checkpoints"]
    label = parts[-1] if parts and not parts[-1].startswith("step") else "/".join(parts[-2:])
    return label if label not in taken else f"{label} ({len(taken) + 1})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from data_prep.tokenizer import load_tokenizer
    from quant.corpora import calibration_windows
    from pretrain.reshard import load_checkpoint
    from quant.load import model_from_checkpoint, start_cli

    device = start_cli()
    results = {}
    for path in [args.checkpoint] + ([args.compare] if args.compare else []):
        ckpt = load_checkpoint(path)
        cfg = ckpt.config
        windows = calibration_windows(load_tokenizer(cfg.data.tokenizer), cfg.model.seq_length,
                                      args.nsamples, args.seed)
        label = _label(path, results)
        log.info(f"analyzing {label} ({ckpt.path}) on {len(windows)} windows")
        results[label] = analyze(model_from_checkpoint(ckpt, device), windows,
                                 cfg.qat.bits if cfg.qat.enabled else None, args.batch_size)
        results[label]["checkpoint"] = ckpt.path
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "analysis.json"), "w") as f:
        json.dump(results, f, indent=1)
    paths = plot(results, args.output)
    for label, res in results.items():
        lin = res["linears"].values()
        log.info(f"{label}: mean kurtosis {sum(s['kurtosis'] for s in lin) / len(lin):.2f} | "
                 f"6x outlier channels {sum(s['outliers_6x'] for s in lin)} | "
                 f"LLM.int8 dims {sum(len(d) for d in res['llm_int8_dims'].values())} | "
                 f"mean rmse_a4 {sum(s['rmse_a4'] for s in lin) / len(lin):.4f}")
    log.info(f"wrote {args.output}/analysis.json and {len(paths)} plots")
    return results


if __name__ == "__main__":
    from quant.load import run_cli
    sys.exit(run_cli(main))
