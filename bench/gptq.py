"""GPTQ of a GPT config on one GPU (4-bit, group 128, act-order, 128 x seq-length calibration
tokens): wall time of the whole block-by-block run and of its Hessian + solve work alone, the
mean relative layer-output error against RTN at the same bits/groups; then INT8 GEMM
(torch._int_mm) against bf16 GEMM at the config's layer shapes.

Usage on a GPU machine: ``python bench/gptq.py --config configs/1b.yaml`` (JSON to $OUT if set).
The weights are a random initialization and the calibration tokens random ids: timing does not
depend on what the model learned.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


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
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gptq.py needs a CUDA GPU")
    from model.gpt import build_gpt
    from pretrain.config import load_config
    from pretrain.parallel import ParallelConfig, init_distributed
    from quant.gptq import QuantSpec, quantize_model

    init_distributed(ParallelConfig())
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = build_gpt(cfg.model).cuda().eval()
    windows = torch.randint(cfg.model.vocab_size, (args.nsamples, cfg.model.seq_length))
    spec = QuantSpec("gptq", bits=4, group_size=128, act_order=True)
    t0 = time.perf_counter()
    results, times = quantize_model(model, windows, spec, args.batch_size)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    out = {"config": args.config, "nsamples": args.nsamples, "blocks": cfg.model.num_layers,
           "total_s": total, "hessian_s": times["hessian"], "solve_s": times["solve"],
           "hessian_plus_solve_s": times["hessian"] + times["solve"],
           "gemm": gemm_times(cfg.model, args.batch_size * cfg.model.seq_length)}
    print(f"GPTQ {args.config}: total {total:.1f} s | hessian+solve {out['hessian_plus_solve_s']:.1f} s "
          f"(hessian {times['hessian']:.1f}, solve {times['solve']:.1f}) | "
          f"{out['hessian_plus_solve_s'] / cfg.model.num_layers:.2f} s/block")
    print(f"{'layer':<6}{'M':>7}{'K':>6}{'N':>6}{'bf16 ms':>9}{'int8 ms':>9}{'speedup':>9}")
    for r in out["gemm"]:
        print(f"{r['layer']:<6}{r['m']:>7}{r['k']:>6}{r['n']:>6}{r['bf16_ms']:>9.3f}{r['int8_ms']:>9.3f}"
              f"{r['speedup']:>9.2f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gptq.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
