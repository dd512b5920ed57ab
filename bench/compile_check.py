"""Does train.compile train the same model as eager on a GPU? Both paths, one after the other in
this process, from the same initial weights on the same random batches (QAT + kurtosis on, clip
init from the first batch): each step's loss and gradient norm, then the gradients of one more
micro-batch by plain autograd at the same weights (the eager run's last), compared parameter by
parameter; plus each path's median step time and peak memory. tests/test_compile.py checks the same on CPU (fp32, tiny); this is the GPU
check at a real size, bf16 by default (``--fp32`` for a tight comparison).

    python bench/compile_check.py --config configs/125m.yaml --micro-batch 16 --steps 8 [--mode reduce-overhead]

Prints a summary and writes compile_check.json to $OUT (or the current directory).
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quiet  # noqa: E402,F401  (first: silences known library noise before any library loads)
import torch  # noqa: E402


def batches(cfg, device):
    g = torch.Generator(device=device).manual_seed(0)
    while True:
        t = torch.randint(cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_length + 1),
                          device=device, generator=g)
        yield {"tokens": t[:, :-1], "labels": t[:, 1:]}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(config: str, overrides: list[str], steps: int, initial: dict | None,
        grads_at: dict | None) -> tuple[dict, dict, dict]:
    """``steps`` trainer steps (layer stats recorded on the last), then one more micro-batch's
    gradients at the weights ``grads_at`` (the other path's final state; None: this path's own);
    and the initial and final states (for the other path). QAT's rounding turns the first
    ulp of difference into whole quantization steps of a few elements, so the two trajectories
    drift apart; gradients are compared at identical weights."""
    from pretrain.config import load_config
    from pretrain.engine import build_engine
    from pretrain.parallel_dims import init_distributed
    from pretrain.parallelize import build_model
    from pretrain.trainer import Trainer
    from qat.quantizer import attach_qat
    from qat.kurtosis import attach_kurtosis

    cfg = load_config(config, overrides)
    dims = init_distributed(cfg.parallel)
    model = build_model(cfg, dims)
    quantizers, penalties = attach_qat(model, cfg.qat), attach_kurtosis(model, cfg.kurtosis)
    if initial is not None:
        model.load_state_dict(initial)
    state = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    data = batches(cfg, trainer.engine.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses, norms, times = [], [], []
    for step in range(steps):
        trainer.record_layer_stats(step == steps - 1)
        sync()
        t0 = time.perf_counter()
        losses.append(trainer.train_step(data).item())
        sync()
        times.append(time.perf_counter() - t0)
        norms.append(float(trainer.engine.get_global_grad_norm() or 0.0))
    _, layers = trainer.interval_metrics()
    final = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    if grads_at is not None:
        model.load_state_dict(grads_at)
        assert not any(q.needs_init for q in quantizers)   # re-read `initialized` eagerly, as the trainer does
    batch = next(data)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(batch["tokens"], batch["labels"]), list(params.values()))   # no engine hooks
    out = {"losses": losses, "grad_norms": norms, "layers": layers,
           "grads": {n: g.detach().float().cpu() for n, g in zip(params, grads)},
           "step_ms": [t * 1e3 for t in times], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0}
    del trainer, model, quantizers, penalties, params, grads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, state, final


def compare(eager: dict, compiled: dict) -> dict:
    """Relative differences: per step (loss, grad norm), per layer metric, per parameter gradient
    (|g_c - g_e| / |g_e| in the 2-norm), with the worst of each."""
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
    grads = {n: float((compiled["grads"][n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in eager["grads"].items()}
    layers = {k: rel(compiled["layers"][k], v) for k, v in eager["layers"].items()}
    return {"loss_rel": [rel(c, e) for c, e in zip(compiled["losses"], eager["losses"])],
            "grad_norm_rel": [rel(c, e) for c, e in zip(compiled["grad_norms"], eager["grad_norms"])],
            "worst_grad_rel": max(grads.items(), key=lambda kv: kv[1]),
            "worst_layer_metric_rel": max(layers.items(), key=lambda kv: kv[1]) if layers else None,
            "grad_rel": grads}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/125m.yaml")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="trainer steps per path, >= 4: the first two compile, the "
                   "last records layer stats (which recompiles); the median step time is of the others")
    p.add_argument("--fp32", action="store_true", help="fp32 instead of the config's precision")
    p.add_argument("--mode", default="default", help="train.compile_mode of the compiled path (reduce-overhead: CUDA graphs)")
    p.add_argument("--dry-run", action="store_true", help="allow a CPU run to check the script (configs/tiny.yaml)")
    args = p.parse_args()
    if args.steps < 4:
        sys.exit("--steps must be >= 4")
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("bench/compile_check.py needs a CUDA GPU (or --dry-run)")
    common = ["--train.micro_batch_size", str(args.micro_batch), "--train.global_batch_size", str(args.micro_batch),
              "--qat.enabled", "true", "--qat.start_step", "0", "--kurtosis.enabled", "true", "--model.dropout", "0"]
    if args.fp32:
        common += ["--train.bf16", "false", "--train.fp16", "false"]
    eager, initial, final = run(args.config, common + ["--train.compile", "false"], args.steps, None, None)
    compiled, _, _ = run(args.config, common + ["--train.compile", "true", "--train.compile_mode", args.mode], args.steps, initial, final)
    result = {"config": args.config, "micro_batch": args.micro_batch, "fp32": args.fp32, "mode": args.mode, **compare(eager, compiled)}
    for name, r in (("eager", eager), ("compiled", compiled)):
        result[name] = {"losses": r["losses"], "grad_norms": r["grad_norms"], "step_ms": r["step_ms"],
                        "median_step_ms": statistics.median(r["step_ms"][2:-1]), "peak_mem_gib": r["peak_mem_gib"]}
    path = os.path.join(os.environ.get("OUT", "."), "compile_check.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"losses eager    {['%.5f' % v for v in eager['losses']]}\n"
          f"losses compiled {['%.5f' % v for v in compiled['losses']]}\n"
          f"max loss rel diff {max(result['loss_rel']):.2e}, max grad-norm rel diff {max(result['grad_norm_rel']):.2e}\n"
          f"worst parameter gradient rel diff {result['worst_grad_rel'][1]:.2e} ({result['worst_grad_rel'][0]})\n"
          f"worst layer metric rel diff {result['worst_layer_metric_rel']}\n"
          f"step ms (median of steps 3..N-1): eager {result['eager']['median_step_ms']:.1f}, "
          f"compiled {result['compiled']['median_step_ms']:.1f}; peak GiB eager {eager['peak_mem_gib']:.2f}, "
          f"compiled {compiled['peak_mem_gib']:.2f}\nwrote {path}")


if __name__ == "__main__":
    main()
