"""Host-dispatched aten ops (and device->host syncs) per training step, split by phase.

Builds the model and engine as training does (``pretrain.parallelize.build_model``, QAT and
kurtosis attached, ``pretrain.engine.build_engine``, ``pretrain.trainer.Trainer``), with QAT and
the kurtosis penalty on from step 0, runs ``--warmup`` steps, then profiles ``--steps`` steps
with torch.profiler (CPU activity only: the count of ops the host dispatches). Each op is
assigned to the phase it ran under: ``forward`` (engine forward), ``backward`` (engine.backward),
``step`` (engine.step: DeepSpeed's overflow check, gradient norm and clipping, our AdamW), or
``other`` (the trainer's own bookkeeping around them). Counted two ways: ``top`` = aten ops
called from Python (not from inside another aten op: what the host dispatches), ``all`` = every
aten event. Syncs: aten::_local_scalar_dense (``.item()``, ``bool(tensor)``, ``float(tensor)``).

CPU or CUDA, one process (PP = 1). The op count does not depend on the batch size or sequence
length, so a large config runs on CPU with small ones, e.g.
``python bench/step_ops.py --config configs/125m.yaml --set model.seq_length=32 train.bf16=true``.
Prints a table; writes JSON to ``--json`` or ``$OUT/step_ops.json``.
"""
import argparse
import collections
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quiet  # noqa: E402,F401  (first: silences known library noise before any library loads)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from train_step import random_batches  # noqa: E402  (bench/train_step.py, this script's folder)

PHASES = ("forward", "backward", "step")
SYNC_OPS = ("aten::_local_scalar_dense",)


def build(config: str, micro: int, overrides: list[str]):
    from pretrain.config import load_config
    from pretrain.engine import build_engine
    from pretrain.parallel_dims import init_distributed
    from pretrain.parallelize import build_model
    from pretrain.trainer import Trainer
    from qat.kurtosis import attach_kurtosis
    from qat.quantizer import attach_qat

    cfg = load_config(config, ["--train.micro_batch_size", str(micro), "--qat.enabled", "true",
                               "--qat.start_step", "0", "--kurtosis.enabled", "true"]
                      + [f"--{kv}" for kv in overrides])
    dims = init_distributed(cfg.parallel)
    cfg.train.global_batch_size = micro * dims.dp       # one micro-batch per DP rank and step
    torch.manual_seed(0)
    model = build_model(cfg, dims)
    quantizers, penalties = attach_qat(model, cfg.qat), attach_kurtosis(model, cfg.kurtosis)
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    return cfg, trainer


def label_phases(engine) -> None:
    """Each engine call runs under a record_function named by its phase (instance attributes:
    the trainer's calls go through them unchanged)."""
    def wrap(name, fn):
        @functools.wraps(fn)
        def labelled(*args, **kwargs):
            with record_function(f"phase::{name}"):
                return fn(*args, **kwargs)
        return labelled
    engine.forward = wrap("forward", engine.forward)
    engine.backward = wrap("backward", engine.backward)
    engine.step = wrap("step", engine.step)


def phase_of(event) -> str:
    e = event
    while e is not None:
        if e.name.startswith("phase::"):
            return e.name[len("phase::"):]
        e = e.cpu_parent
    return "other"


def is_top(event) -> bool:
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith("aten::"):
            return False
        e = e.cpu_parent
    return True


def count(events, steps: int, top_n: int) -> dict:
    per_phase = {k: collections.Counter() for k in ("top", "all")}
    names = collections.Counter()
    step_names = collections.Counter()
    syncs = collections.Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        phase = phase_of(e)
        per_phase["all"][phase] += 1
        if e.name in SYNC_OPS:
            syncs[phase] += 1
        if is_top(e):
            per_phase["top"][phase] += 1
            names[e.name] += 1
            if phase == "step":
                step_names[e.name] += 1
    per_step = lambda c: {k: round(v / steps, 1) for k, v in sorted(c.items())}  # noqa: E731
    return {"aten_ops_per_step": {kind: {"total": round(sum(c.values()) / steps, 1), **per_step(c)}
                                  for kind, c in per_phase.items()},
            "syncs_per_step": {"total": round(sum(syncs.values()) / steps, 1), **per_step(syncs)},
            "top_ops": {n: round(c / steps, 1) for n, c in names.most_common(top_n)},
            "top_step_ops": {n: round(c / steps, 1) for n, c in step_names.most_common(top_n)}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--json", help="output file (default $OUT/step_ops.json when $OUT is set)")
    args = p.parse_args()
    cfg, trainer = build(args.config, args.micro_batch, args.set)
    device = trainer.engine.device
    batches = random_batches(cfg, args.micro_batch, device)
    label_phases(trainer.engine)
    for _ in range(args.warmup):
        trainer.train_step(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            trainer.train_step(batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    result = {"config": args.config, "overrides": args.set, "device": str(device), "steps": args.steps,
              "micro_steps_per_step": trainer.gas, "torch": torch.__version__,
              "params": sum(1 for p in trainer.engine.module.parameters() if p.requires_grad),
              **count(prof.events(), args.steps, args.top)}
    print(json.dumps(result, indent=1))
    path = args.json or (os.path.join(os.environ["OUT"], "step_ops.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
