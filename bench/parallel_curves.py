"""Do parallel layouts train like one GPU? The same model, data and seed trained under each layout
(`pretrain.train`, QAT + kurtosis on, bf16), its per-step loss compared with the one-GPU run's.

bf16 noise is measured in the same run: the one-GPU run repeated with half the micro-batch and twice
the accumulation ("noise") takes mathematically the same steps, so its distance from the reference
curve is rounding alone; that is the yardstick. A layout follows the one-GPU curve within bf16 noise
when its mean |loss difference| over the steps is no larger than that. ("fp32" runs the reference in
fp32 for comparison: on the H200 it drifted 0.08 above the bf16 curve over 200 steps, more than noise.)
Every layout starts from the same weights (`pretrain.parallelize.build_model`) and reads the same
samples in the same order (`data_prep.micro_batches` does not depend on DP).

Usage on a 2-GPU machine (DATA holds train.*, valid.* and tokenizer.model from data_prep):
    python bench/parallel_curves.py --data DATA --config configs/125m.yaml --steps 200
One-GPU runs share the machine's GPUs concurrently; each multi-GPU run takes them all. Runs go to
runs/parallel_curves/<layout> (replaced); curves.json and curves.png to $OUT (or that directory).
On a CPU, `--dry-run` checks the script with gloo processes: --config configs/tiny.yaml.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import NO_MULTICAST  # noqa: E402

# name: (processes, overrides); "ref" is the one-GPU bf16 run, "noise" the same steps rounded differently.
LAYOUTS = {
    "ref": (1, []),
    "noise": (1, ["--train.micro_batch_size", "HALF"]),
    "fp32": (1, ["--train.bf16", "false"]),
    "tp2": (2, ["--parallel.tensor", "2"]),
    "tp2-sp": (2, ["--parallel.tensor", "2", "--parallel.sequence_parallel", "true"]),
    "pp2": (2, ["--parallel.pipeline", "2"]),
    "dp2-zero1": (2, ["--parallel.zero_stage", "1"]),
    "dp2-zero2": (2, ["--parallel.zero_stage", "2"]),
}
OUT_ROOT = "runs/parallel_curves"


def command(name: str, args) -> tuple[list[str], dict]:
    procs, extra = LAYOUTS[name]
    extra = [str(args.micro_batch // 2) if e == "HALF" else e for e in extra]
    d = args.data
    train = ["-m", "pretrain.train", "--config", args.config, "--train.steps", str(args.steps),
             "--train.micro_batch_size", str(args.micro_batch), "--train.global_batch_size", str(args.global_batch),
             "--train.bf16", "false" if args.dry_run else "true", "--train.log_interval", "1",
             "--train.eval_interval", "0", "--optim.warmup_steps", str(max(1, args.steps // 10)),
             "--checkpoint.interval", "0", "--checkpoint.resume", "none", "--train.out_dir", f"{OUT_ROOT}/{name}",
             "--data.paths", f"[{d}/train]", "--data.valid_paths", f"[{d}/valid]",
             "--data.tokenizer", f"{d}/tokenizer.model", "--data.cache_dir", f"{OUT_ROOT}/{name}/index-cache",
             "--qat.enabled", "true", "--qat.start_step", "0", "--kurtosis.enabled", "true",
             ] + args.train_args.split() + extra
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(procs)]
    return launcher + train, {**os.environ, **NO_MULTICAST}


def run_all(names: list[str], args, gpus: int) -> dict:
    """Run the layouts, one-GPU ones side by side on separate GPUs; returns {name: seconds}."""
    pending, seconds = list(names), {}
    while pending:
        batch = [pending.pop(0)]
        while batch and LAYOUTS[batch[0]][0] == 1 and pending and LAYOUTS[pending[0]][0] == 1 and len(batch) < gpus:
            batch.append(pending.pop(0))
        procs = []
        for i, name in enumerate(batch):
            shutil.rmtree(f"{OUT_ROOT}/{name}", ignore_errors=True)
            os.makedirs(f"{OUT_ROOT}/{name}")
            cmd, env = command(name, args)
            if LAYOUTS[name][0] == 1 and not args.dry_run:
                env["CUDA_VISIBLE_DEVICES"] = str(i)
            log = open(f"{OUT_ROOT}/{name}/stdout.log", "w")
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        for name, proc, t0 in procs:
            rc = proc.wait()
            seconds[name] = time.time() - t0
            print(f"{name}: exit {rc} in {seconds[name]:.0f} s", flush=True)
            if rc:
                with open(f"{OUT_ROOT}/{name}/stdout.log") as f:
                    print(f.read()[-3000:])
                raise SystemExit(f"layout {name} failed")
    return seconds


def losses(name: str) -> dict[int, float]:
    with open(f"{OUT_ROOT}/{name}/metrics.jsonl") as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def valid_loss(name: str) -> float | None:
    with open(f"{OUT_ROOT}/{name}/stdout.log") as f:
        found = [line.rsplit(" ", 1)[-1] for line in f if "final valid loss" in line]
    return float(found[-1]) if found else None


def compare(names: list[str]) -> dict:
    """Per layout: mean / max |loss - ref loss| over the steps, and the last-10-step means."""
    ref = losses("ref")
    rows = {}
    for name in names:
        cur = losses(name)
        steps = sorted(ref.keys() & cur.keys())
        diff = [abs(cur[s] - ref[s]) for s in steps]
        last = steps[-10:]
        rows[name] = {"steps": len(steps), "mean_abs_diff": sum(diff) / len(diff), "max_abs_diff": max(diff),
                      "last10_loss": sum(cur[s] for s in last) / len(last), "valid_loss": valid_loss(name),
                      "first_loss": cur[steps[0]], "curve": [cur[s] for s in steps]}
    noise = rows["noise"]["mean_abs_diff"] if "noise" in rows else None
    for name, row in rows.items():
        if noise and name not in ("ref", "noise", "fp32"):
            row["vs_bf16_noise"] = row["mean_abs_diff"] / noise
            row["within_noise"] = row["mean_abs_diff"] <= noise
    return rows


def plot(rows: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    ref = rows["ref"]["curve"]
    for name, row in rows.items():
        a.plot(row["curve"], label=name, lw=1)
        if name != "ref":
            d = [c - r for c, r in zip(row["curve"], ref)]
            b.plot(d, label=f"{name} (mean |d| {row['mean_abs_diff']:.4f})", lw=1)
    a.set(xlabel="step", ylabel="train loss", title="loss per step")
    b.set(xlabel="step", ylabel="loss - one-GPU bf16 loss", title="difference from the one-GPU bf16 run")
    a.legend(), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="directory with train.*, valid.*, tokenizer.model")
    p.add_argument("--config", default="configs/125m.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--layouts", default="noise,tp2,pp2,dp2-zero1,dp2-zero2",
                   help=f"subset of {','.join(LAYOUTS)} (ref is always run)")
    p.add_argument("--train-args", default="", help="extra pretrain.train overrides for every layout")
    p.add_argument("--dry-run", action="store_true", help="CPU check with gloo (fp32 everywhere)")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("bench/parallel_curves.py needs GPUs (or --dry-run)")
    names = ["ref"] + [n for n in args.layouts.split(",") if n != "ref"]
    unknown = set(names) - LAYOUTS.keys()
    if unknown:
        sys.exit(f"unknown layouts {sorted(unknown)}; known: {list(LAYOUTS)}")
    gpus = torch.cuda.device_count() if not args.dry_run else 2
    seconds = run_all(names, args, gpus)
    rows = compare(names)
    print(f"\n{'layout':<11}{'mean|d|':>9}{'max|d|':>9}{'vs noise':>9}{'last-10 loss':>13}{'valid':>8}{'seconds':>8}")
    for name, row in rows.items():
        ratio = f"{row['vs_bf16_noise']:.2f}" if "vs_bf16_noise" in row else "-"
        valid = f"{row['valid_loss']:.4f}" if row["valid_loss"] is not None else "-"
        print(f"{name:<11}{row['mean_abs_diff']:>9.4f}{row['max_abs_diff']:>9.4f}{ratio:>9}"
              f"{row['last10_loss']:>13.4f}{valid:>8}{seconds[name]:>8.0f}")
    out = os.environ.get("OUT", OUT_ROOT)
    with open(os.path.join(out, "curves.json"), "w") as f:
        json.dump({"config": args.config, "steps": args.steps, "global_batch": args.global_batch,
                   "micro_batch": args.micro_batch, "seconds": seconds, "layouts": rows}, f, indent=1)
    plot(rows, os.path.join(out, "curves.png"))


if __name__ == "__main__":
    main()
