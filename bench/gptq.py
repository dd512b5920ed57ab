"""GPTQ of a GPT config (4-bit, group 128, act-order, 128 x seq-length calibration tokens) on one
or more GPUs: wall time of the block-by-block run and of its phases, and a sha256 digest of every
QuantizedWeight so runs on different numbers of GPUs, or by different variants of the same
computation, can be checked for bit-identical results; then (rank 0, unless --no-gemm) INT8 GEMM
(torch._int_mm) against bf16 GEMM at the config's shapes.

    python bench/gptq.py --config configs/1b.yaml                              # one GPU
    python bench/gptq.py --config configs/1b.yaml --no-gemm --variants reference,fast
    torchrun --nproc-per-node 2 bench/gptq.py --config configs/1b.yaml --no-gemm
    python bench/gptq.py --dry-run        # configs/tiny.yaml, 8 windows, no GEMM: runs on CPU too

Variants (quant.quantize.quantize_model's speed options; each starts from the same initial weights, in
the order given): reference = every calibration pass recomputes the block from its input and the
solver launches its kernels one by one (the float operations of the path before issue 14); fast =
the defaults (passes reuse earlier ones: the forward phase; solver blocks replayed from CUDA graphs:
the solve phase).
Rank 0 prints and writes $OUT/gptq_world{N}.json if OUT is set. The weights are a random
initialization and the calibration tokens random ids: timing does not depend on what the model
learned, and every rank builds the same model and windows from fixed seeds.
"""
import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quiet  # noqa: E402,F401  (first: silences known library noise before any library loads)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from quant.grid import QuantizedWeight  # noqa: E402

VARIANTS = {"reference": dict(reuse=False, cuda_graph=False), "fast": dict(reuse=True, cuda_graph=True)}


def digest(results: dict) -> str:
    """sha256 over the bytes of every QuantizedWeight tensor, by sorted name then field."""
    h = hashlib.sha256()
    for name in sorted(results):
        for field in QuantizedWeight.TENSORS:
            t = getattr(results[name], field).detach().cpu().contiguous()
            h.update(f"{name}.{field}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gemm_times(cfg, tokens: int) -> list[dict]:
    from triton.testing import do_bench

    from quant.int8 import int_gemm
    d, f = cfg.hidden_size, cfg.ffn_size
    rows = []
    for name, (k, n) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, f), "fc2": (f, d)}.items():
        a, b = torch.randn(tokens, k, device="cuda"), torch.randn(n, k, device="cuda")
        a8, b8 = a.to(torch.int8), b.to(torch.int8)
        a16, b16 = a.bfloat16(), b.bfloat16()
        t16 = do_bench(lambda: a16 @ b16.t(), return_mode="median")
        t8 = do_bench(lambda: int_gemm(a8, b8), return_mode="median")
        rows.append({"layer": name, "m": tokens, "k": k, "n": n, "bf16_ms": t16, "int8_ms": t8,
                     "speedup": t16 / t8})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/1b.yaml")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128; 8 with --dry-run)")
    p.add_argument("--batch-size", type=int, help="windows per forward (default 8; 2 with --dry-run)")
    p.add_argument("--variants", default="fast",
                   help=f"comma-separated, run in this order from the same weights: {', '.join(VARIANTS)}")
    p.add_argument("--no-gemm", action="store_true", help="skip the INT8 GEMM timing")
    p.add_argument("--dry-run", action="store_true",
                   help="configs/tiny.yaml, few windows, no GEMM: a quick check that runs on CPU")
    args = p.parse_args()
    variants = args.variants.split(",")
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants takes a comma-separated list of {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.dry_run:
        args.config, args.no_gemm = "configs/tiny.yaml", True
        # One thread: CPU matmuls may round differently with another thread count, and torchrun
        # runs one thread per rank.
        torch.set_num_threads(1)
    args.nsamples = args.nsamples or (8 if args.dry_run else 128)
    args.batch_size = args.batch_size or (2 if args.dry_run else 8)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        sys.exit("bench/gptq.py needs a CUDA GPU (use --dry-run for the CPU check)")
    from model.gpt import build_gpt
    from pretrain.config import load_config
    from pretrain.parallel_dims import ParallelConfig, init_distributed
    from quant.quantize import QuantSpec, quantize_model

    init_distributed(ParallelConfig())
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    cfg = load_config(args.config)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_gpt(cfg.model).to(device).eval()
    initial = [param.detach().cpu().clone() for param in model.parameters()]  # quantize_model changes weights
    windows = torch.randint(cfg.model.vocab_size, (args.nsamples, cfg.model.seq_length),
                            generator=torch.Generator().manual_seed(1))
    spec = QuantSpec("gptq", bits=4, group_size=128, act_order=True)
    build_s = time.perf_counter() - t0
    runs = []
    for name in variants:
        with torch.no_grad():
            for param, value in zip(model.parameters(), initial):
                param.copy_(value)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        t1 = time.perf_counter()
        results, times = quantize_model(model, windows, spec, args.batch_size, **VARIANTS[name])
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        quantize_s = t2 - t1
        runs.append({"variant": name, "options": VARIANTS[name], "sha256": digest(results),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                     "times": {"quantize_s": quantize_s, "hessian_s": times["hessian"],
                               "solve_s": times["solve"],     # chain reduce + owner solves + broadcast
                               "hessian_solve_s": times["hessian"] + times["solve"],
                               "forward_s": quantize_s - times["hessian"] - times["solve"],
                               "digest_s": time.perf_counter() - t2}})
    if rank != 0:
        dist.barrier()
        return
    out = {"config": args.config, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "world_size": world, "nsamples": args.nsamples, "batch_size": args.batch_size,
           "blocks": cfg.model.num_layers, "linears": len(results), "build_s": build_s, "variants": runs,
           "same_sha256": len({r["sha256"] for r in runs}) == 1,
           "gemm": None if args.no_gemm else gemm_times(cfg.model, args.batch_size * cfg.model.seq_length)}
    print(f"GPTQ {args.config} on {world} rank(s), build {build_s:.1f} s")
    for r in runs:
        t = r["times"]
        peak = f" | peak {r['peak_gib']:.1f} GiB" if cuda else ""
        print(f"{r['variant']:<10} quantize {t['quantize_s']:.1f} s | hessian+solve {t['hessian_solve_s']:.1f} s "
              f"(hessian {t['hessian_s']:.1f}, solve+reduce {t['solve_s']:.1f}), forward {t['forward_s']:.1f} s | "
              f"{t['quantize_s'] / cfg.model.num_layers:.2f} s/block{peak} | sha256 {r['sha256']}")
    print(f"sha256 of {len(results)} QuantizedWeights {'the same' if out['same_sha256'] else 'DIFFER'} "
          f"across {', '.join(variants)}")
    if out["gemm"]:
        print(f"{'layer':<6}{'M':>7}{'K':>6}{'N':>6}{'bf16 ms':>9}{'int8 ms':>9}{'speedup':>9}")
        for r in out["gemm"]:
            print(f"{r['layer']:<6}{r['m']:>7}{r['k']:>6}{r['n']:>6}{r['bf16_ms']:>9.3f}{r['int8_ms']:>9.3f}"
                  f"{r['speedup']:>9.2f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"gptq_world{world}.json"), "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
