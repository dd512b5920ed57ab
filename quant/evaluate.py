"""W16A16 / W8A8 / W4A16 / W4A4 evaluation of a checkpoint: ``python -m quant.evaluate``.

    python -m quant.evaluate --checkpoint runs/demo --quantized runs/demo/w4-gptq --output eval.json
    python -m quant.evaluate --checkpoint runs/demo --weights 4 --acts 4 --tasks piqa --limit 100

Per configuration: perplexity on WikiText-2 test and on the C4 evaluation slice (disjoint from
GPTQ's calibration slice; quant.corpora), and zero-shot accuracy through lm-eval (quant.tasks).
Perplexity follows GPTQ: non-overlapping windows of the model's sequence length, the tail
dropped, exp of the mean over windows of each window's mean next-token loss. Weights and
activations are quantized by quant.convert; one table with each score's change relative to
W16A16 in percent is printed and saved as JSON.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import json
import logging
import math
import re
import sys
import time

import torch

from kernels import cross_entropy
from quant.convert import QUANTIZERS_OFF

log = logging.getLogger("quant")
CONFIGS = {"W16A16": (16, 16), "W8A8": (8, 8), "W4A16": (4, 16), "W4A4": (4, 4)}   # the default table
CONFIG_NAME = re.compile(r"^W(16|8|4|3|2)A(16|8|4|3|2)$")                          # any of quant.convert.BITS
LOWER_IS_BETTER = ("ppl",)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, label: str = "") -> float:
    """exp(mean over windows of the window's mean next-token cross entropy); windows [n, seq]."""
    device = next(model.parameters()).device
    total, start = 0.0, time.perf_counter()
    batches = range(0, len(windows), batch_size)
    for k, i in enumerate(batches):
        batch = windows[i:i + batch_size].to(device)
        losses = cross_entropy(model(batch)[:-1], batch.t()[1:])          # [s-1, b], the training loss
        total += losses.mean(dim=0).sum().item()
        if k % 20 == 19:
            rate = (k + 1) / (time.perf_counter() - start)
            log.info(f"  {label} ppl batch {k + 1}/{len(batches)} | {rate:.2f} batch/s | "
                     f"ETA {(len(batches) - k - 1) / rate:.0f} s")
    return math.exp(total / len(windows))


def config_name(weights: int, acts: int) -> str:
    return f"W{weights}A{acts}"


def parse_config(name: str) -> tuple[int, int]:
    """``"W3A16"`` -> (3, 16); raises ValueError for anything that is not a WxAy name."""
    m = CONFIG_NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a configuration name like W4A4 (bits 16, 8, 4, 3 or 2)")
    return int(m.group(1)), int(m.group(2))


def degradation_table(scores: dict[str, dict[str, float]], baseline: str = "W16A16") -> dict:
    """Per configuration and metric: the value and its change vs the baseline in percent
    (positive = worse for perplexities, negative = worse for accuracies)."""
    base = scores.get(baseline, {})
    table = {}
    for cfg, metrics in scores.items():
        table[cfg] = {m: {"value": v, "change_pct": (100.0 * (v / base[m] - 1.0) if base.get(m) else None)}
                      for m, v in metrics.items()}
    return table


def format_table(table: dict, marked=()) -> str:
    """The table as text; the ``marked`` configurations (a QAT model's A16 ones) get a † and a footnote."""
    metrics = list(next(iter(table.values())))
    rows = [["config"] + metrics]
    for cfg, cells in table.items():
        row = [cfg + (" †" if cfg in marked else "")]
        for m in metrics:
            c = cells[m]
            pct = "" if c["change_pct"] is None or cfg == "W16A16" else f" ({c['change_pct']:+.1f}%)"
            row.append(f"{c['value']:.4g}{pct}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    if any(cfg in marked for cfg in table):
        lines.append(f"† {QUANTIZERS_OFF}: a QAT model runs with its learned clips (W16A4 is the model as trained)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    from quant.tasks import TASKS
    p = argparse.ArgumentParser(prog="python -m quant.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    p.add_argument("--quantized", help="output dir of python -m quant.quantize (weights of its bit width)")
    p.add_argument("--weights", type=int, choices=(16, 8, 4), help="one configuration (with --acts), "
                   "evaluated next to W16A16; default: all of " + ", ".join(CONFIGS))
    p.add_argument("--acts", type=int, choices=(16, 8, 4))
    p.add_argument("--configs", nargs="+", metavar="WxAy", help=f"configurations to run (default {' '.join(CONFIGS)}; "
                   "any weight/activation bits of 16, 8, 4, 3, 2, e.g. W3A16)")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), help=f"zero-shot tasks of {TASKS}; none: skip")
    p.add_argument("--limit", type=int, help="examples per zero-shot task (quick runs)")
    p.add_argument("--ppl-windows", type=int, help="at most this many perplexity windows per corpus")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", help="JSON file for the table")
    args = p.parse_args(argv)
    if (args.weights is None) != (args.acts is None):
        p.error("--weights and --acts go together")
    if args.weights is not None and args.configs:
        p.error("give either --weights/--acts or --configs")
    for name in args.configs or ():
        try:
            parse_config(name)
        except ValueError as e:
            p.error(str(e))
    return args


def selected_configs(args) -> dict[str, tuple[int, int]]:
    if args.weights is not None:
        return {"W16A16": (16, 16), config_name(args.weights, args.acts): (args.weights, args.acts)}
    names = args.configs or list(CONFIGS)
    return {n: parse_config(n) for n in (["W16A16"] if "W16A16" not in names else []) + names}


def check_source(manifest: dict, ckpt, quantized: str) -> None:
    """Refuses quantized weights made from another model than the checkpoint (a CheckpointError
    naming the differing model fields)."""
    from pretrain.checkpoint import CheckpointError

    source, mine = manifest.get("info", {}).get("config", {}).get("model"), ckpt.meta["config"]["model"]
    if source is not None and source != mine:
        diff = "; ".join(f"model.{k}: {source.get(k)} there, {mine.get(k)} here"
                         for k in sorted(set(source) | set(mine)) if source.get(k) != mine.get(k))
        raise CheckpointError(f"{quantized} was quantized from another model than {ckpt.path} ({diff})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from data_prep.tokenizer import load_tokenizer
    from quant import quantize
    from quant.convert import convert
    from quant.corpora import perplexity_sets
    from pretrain.reshard import load_checkpoint
    from quant.load import model_from_checkpoint, start_cli

    ckpt = load_checkpoint(args.checkpoint)      # both refused before any work
    quantized, manifest = {}, None
    if args.quantized:
        quantized, _, manifest = quantize.load(args.quantized)
        check_source(manifest, ckpt, args.quantized)
    device = start_cli()
    cfg = ckpt.config
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    sets = {name: w[:args.ppl_windows] for name, w in perplexity_sets(tokenizer, cfg.model.seq_length).items()}
    scores, described = {}, {}
    for name, (weights, acts) in selected_configs(args).items():
        t0 = time.perf_counter()
        model = model_from_checkpoint(ckpt, device)
        described[name] = convert(model, weights, acts, quantized)
        log.info(f"{name}: weights {described[name]['weights']}; activations {described[name]['acts']}")
        scores[name] = {f"{corpus}_ppl": perplexity(model, w, args.batch_size, f"{name} {corpus}")
                        for corpus, w in sets.items()}
        if args.tasks:   # lm-eval is needed only here (GPU images may lack it)
            from quant.lm_eval_adapter import GPTLM, run_tasks
            lm = GPTLM(model, tokenizer, cfg.model.seq_length, args.batch_size)
            for task, metrics in run_tasks(lm, args.tasks, args.limit).items():
                scores[name][f"{task}_acc"] = metrics["acc"]
        log.info(f"{name} done in {time.perf_counter() - t0:.0f} s: "
                 + ", ".join(f"{k} {v:.4g}" for k, v in scores[name].items()))
    table = degradation_table(scores)
    print(format_table(table, [name for name, d in described.items() if d["acts"] == QUANTIZERS_OFF]), flush=True)
    report = {"checkpoint": ckpt.path, "quantized": args.quantized,
              "quantized_method": manifest and manifest["method"], "tasks": args.tasks, "limit": args.limit,
              "ppl_windows": {k: len(w) for k, w in sets.items()}, "configs": described, "table": table}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        log.info(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    from quant.load import run_cli
    sys.exit(run_cli(main))
