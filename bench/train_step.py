"""Training step time and peak memory on one GPU, side by side in one run:

* ``plain``: a single-GPU PyTorch GPT of the same shapes (nn.Linear, SDPA, fused AdamW, bf16
  autocast, eager): the reference our stack must stay within 5 % of;
* ``plain-compile``: the same under ``torch.compile`` (the strongest single-GPU reference);
* ``ours``: this project's stack (megatron-core TP=1 layers, DeepSpeed ZeRO-1, bf16);
* ``ours-qat``: ours with 4-bit QAT on every block linear input and the kurtosis penalty on;
* ``ours-qat-only``: QAT without the kurtosis penalty.

Each variant runs in its own process (clean peak memory). Usage on a GPU machine:
``python bench/train_step.py --config configs/1b.yaml`` (prints a table; JSON to $OUT if set).
``--repeats N`` runs the variant list N times interleaved (A B C A B C ...) and reports each
variant's median step time, so drift of the machine over the run hits every variant alike.

A variant is ``[Nx]NAME[@section.key=value...]``: ``2xours`` is ours on 2 GPUs under torchrun
(data parallel: each GPU runs the micro-batch, global batch = micro-batch x DP),
``2xours@parallel.tensor=2`` the same model split by TP=2. The table gives tokens/s per GPU and
the scaling efficiency against the one-GPU run of the same NAME.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quiet  # noqa: E402,F401  (first: silences known library noise before any library loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class PlainBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, ffn), torch.nn.Linear(ffn, d)
        self.heads = heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PlainGPT(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.tok, self.pos = torch.nn.Embedding(cfg.vocab_size, d), torch.nn.Embedding(cfg.seq_length, d)
        self.blocks = torch.nn.ModuleList(PlainBlock(d, cfg.num_heads, cfg.ffn_size) for _ in range(cfg.num_layers))
        self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, cfg.vocab_size, bias=False)

    def forward(self, tokens, labels):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


# NVLink multicast stays off in every process this starts (it can take a shared host's GPUs down).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def random_batches(cfg, micro: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    while True:
        t = torch.randint(cfg.model.vocab_size, (micro, cfg.model.seq_length + 1), device=device, generator=g)
        yield {"tokens": t[:, :-1], "labels": t[:, 1:]}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - t0) / steps


def print_profile(step, steps: int = 3) -> dict:
    """The GPU kernels that take the most time over a few steps (after the timed ones), and how
    much of the profiled steps' wall time the GPU was busy: far below 100 % means the host bounds
    the step (launches, Python, syncs), not the kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
    print(events.table(sort_by="device_time_total", row_limit=60, max_name_column_width=70))
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / steps / 1e3
    print(f"profiled: {wall:.1f} ms/step wall, GPU busy {busy:.1f} ms/step ({busy / wall:.0%})")
    return {"profiled_ms": wall, "gpu_busy_ms": busy}


def parse_spec(spec: str) -> tuple[int, str, list[str]]:
    """``"2xours@parallel.tensor=2"`` -> (2, "ours", ["parallel.tensor=2"])."""
    variant, *extra = spec.split("@")
    gpus, _, name = variant.rpartition("x") if variant[:1].isdigit() else ("1", "", variant)
    return int(gpus), name, extra


def run_variant(spec: str, config: str, micro: int, steps: int, warmup: int, profile: bool = False) -> dict:
    """``spec`` is ``[Nx]NAME[@overrides]`` (see the module docstring); this process is one of N."""
    from pretrain.config import load_config, world_size_from_env
    from pretrain.metrics import flops_per_token, matmul_params

    gpus, variant, extra = parse_spec(spec)
    cfg = load_config(config, ["--train.micro_batch_size", str(micro),
                               "--qat.enabled", str(variant.startswith("ours-qat")).lower(), "--qat.start_step", "0",
                               "--kurtosis.enabled", str(variant == "ours-qat").lower()]
                      + [f"--{kv}" for kv in extra])
    world = world_size_from_env()
    plain = variant in ("plain", "plain-compile")
    if world != gpus or (plain and gpus > 1):
        raise SystemExit(f"{spec}: needs {gpus} processes (got {world}); plain runs on one GPU")
    dp = world // (cfg.parallel.tensor * cfg.parallel.pipeline)
    cfg.train.global_batch_size = micro * dp       # one micro-batch per DP rank and step
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = random_batches(cfg, micro, device)
    torch.manual_seed(0)
    if plain:
        model = PlainGPT(cfg.model).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda")
        forward = torch.compile(model) if variant == "plain-compile" else model

        def step():
            b = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(b["tokens"], b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from pretrain.engine import build_engine
        from pretrain.parallel_dims import init_distributed
        from pretrain.parallelize import build_model
        from pretrain.trainer import Trainer
        from qat.quantizer import attach_qat
        from qat.kurtosis import attach_kurtosis

        dims = init_distributed(cfg.parallel)
        model = build_model(cfg, dims)   # as training builds it (train.compile, activation checkpointing)
        quantizers, penalties = attach_qat(model, cfg.qat), attach_kurtosis(model, cfg.kurtosis)
        trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)

        def step():
            trainer.train_step(batches)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = time_steps(step, steps, warmup)
    busy = print_profile(step) if profile else {}
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    tflops = flops_per_token(cfg.model, matmul_params(cfg.model)) * tokens / dt / 1e12 / world
    return {"variant": spec, "gpus": world, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt,
            "tokens_per_s_per_gpu": tokens / dt / world, "tflops_per_gpu": tflops,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0,
            "params_per_gpu": sum(p.numel() for p in model.parameters()), **busy}


def _median_run(variant: str, runs: list[dict]) -> dict:
    """The run with the median step time (all its numbers), and the step times of every run."""
    ok = sorted((r for r in runs if "step_ms" in r), key=lambda r: r["step_ms"])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2], "all_step_ms": [round(r["step_ms"], 2) for r in ok]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/1b.yaml")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default="plain,plain-compile,ours,ours-qat,ours-qat-only")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of the variant list; medians reported")
    p.add_argument("--profile", action="store_true", help="print each variant's top GPU kernels and how busy the GPU was")
    p.add_argument("--dry-run", action="store_true", help="allow a CPU run (gloo) to check the script, e.g. with "
                                                           "--config configs/tiny.yaml --variants ours,2xours")
    p.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one variant in this process
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("bench/train_step.py needs a CUDA GPU (or --dry-run)")
    if args.one:
        result = run_variant(args.one, args.config, args.micro_batch, args.steps, args.warmup, args.profile)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result))
        return
    runs = {v: [] for v in args.variants.split(",")}
    env = {**os.environ, **NO_MULTICAST}
    for _, variant in itertools.product(range(args.repeats), runs):
        gpus = parse_spec(variant)[0]
        launcher = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc-per-node", str(gpus)]
        out = subprocess.run(launcher + [__file__, "--one", variant, "--config", args.config,
                                         "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
                                         "--warmup", str(args.warmup)] + (["--profile"] if args.profile else [])
                             + (["--dry-run"] if args.dry_run else []),
                             capture_output=True, text=True, env=env)
        if args.profile:
            print(f"==== {variant}\n" + "\n".join(l for l in out.stdout.splitlines() if not l.startswith("RESULT")))
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            print(out.stdout[-3000:], out.stderr[-3000:])
            runs[variant].append({"variant": variant, "error": out.returncode})
            continue
        runs[variant].append(json.loads(lines[-1][7:]))
        print(f"done {variant}: {runs[variant][-1]['step_ms']:.1f} ms/step", flush=True)
    results = [_median_run(v, rs) for v, rs in runs.items()]
    base = {r["variant"]: r for r in results if "step_ms" in r}
    print(f"\n{'variant':<40}{'ms/step':>9}{'tok/s/GPU':>11}{'TFLOP/s/GPU':>12}{'peak GiB':>10}"
          f"{'vs plain':>10}{'vs compile':>11}{'vs ours':>9}{'scaling':>9}")
    for r in results:
        if "step_ms" not in r:
            print(f"{r['variant']:<40} failed")
            continue
        gpus, name, extra = parse_spec(r["variant"])
        same_layout = lambda k: ("" if gpus == 1 else f"{gpus}x") + k + "".join("@" + e for e in extra)  # noqa: E731
        rel = lambda k: (f"{r['step_ms'] / base[same_layout(k)]['step_ms'] - 1:+.1%}"  # noqa: E731
                         if same_layout(k) in base else "-")
        one = base.get(name)                                 # the same NAME on one GPU
        if one and r["gpus"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
        eff = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        print(f"{r['variant']:<40}{r['step_ms']:>9.1f}{r['tokens_per_s_per_gpu']:>11.0f}{r['tflops_per_gpu']:>12.1f}"
              f"{r['peak_mem_gib']:>10.2f}{rel('plain'):>10}{rel('plain-compile'):>11}{rel('ours'):>9}{eff:>9}  {r.get('all_step_ms', '')}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
            json.dump({"config": args.config, "micro_batch": args.micro_batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
