"""Training step time and peak memory on one GPU, side by side in one run:

* ``plain``: a single-GPU PyTorch GPT of the same shapes (nn.Linear, SDPA, fused AdamW, bf16
  autocast, eager): the reference our stack must stay within 5 % of;
* ``ours``: this project's stack (megatron-core TP=1 layers, DeepSpeed ZeRO-1, bf16);
* ``ours-qat``: ours with 4-bit QAT on every block linear input and the kurtosis penalty on;
* ``ours-qat-only``: QAT without the kurtosis penalty.

Each variant runs in its own process (clean peak memory). Usage on a GPU machine:
``python bench/train_step.py --config configs/1b.yaml`` (prints a table; JSON to $OUT if set).
``--repeats N`` runs the variant list N times interleaved (A B C A B C ...) and reports each
variant's median step time, so drift of the machine over the run hits every variant alike.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def random_batches(cfg, micro: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    while True:
        t = torch.randint(cfg.model.vocab_size, (micro, cfg.model.seq_length + 1), device=device, generator=g)
        yield {"tokens": t[:, :-1], "labels": t[:, 1:]}


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def print_profile(step, steps: int = 3) -> None:
    """The GPU kernels that take the most time over a few steps (after the timed ones)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=60, max_name_column_width=70))


def run_variant(spec: str, config: str, micro: int, steps: int, warmup: int, profile: bool = False) -> dict:
    """``spec`` is a variant name, optionally with config overrides: ``ours@parallel.zero_stage=0``."""
    from pretrain.config import load_config
    from pretrain.metrics import flops_per_token, matmul_params

    variant, *extra = spec.split("@")
    cfg = load_config(config, ["--train.micro_batch_size", str(micro), "--train.global_batch_size", str(micro),
                               "--qat.enabled", str(variant.startswith("ours-qat")).lower(),
                               "--kurtosis.enabled", str(variant == "ours-qat").lower()]
                      + [f"--{kv}" for kv in extra])
    device = torch.device("cuda")
    batches = random_batches(cfg, micro, device)
    torch.manual_seed(0)
    if variant == "plain":
        model = PlainGPT(cfg.model).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

        def step():
            b = next(batches)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(b["tokens"], b["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from model.gpt import build_gpt
        from pretrain.engine import build_engine
        from pretrain.parallel import init_distributed
        from pretrain.trainer import Trainer
        from quant.qat import attach_qat
        from quant.regularize import attach_kurtosis

        dims = init_distributed(cfg.parallel)
        model = build_gpt(cfg.model, cfg.parallel.sequence_parallel)
        quantizers, penalties = attach_qat(model, cfg.qat), attach_kurtosis(model, cfg.kurtosis)
        trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)

        def step():
            trainer.train_step(batches)

    torch.cuda.reset_peak_memory_stats()
    dt = time_steps(step, steps, warmup)
    if profile:
        print_profile(step)
    tokens = micro * cfg.model.seq_length
    tflops = flops_per_token(cfg.model, matmul_params(cfg.model)) * tokens / dt / 1e12
    return {"variant": spec, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt, "tflops": tflops,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "params": sum(p.numel() for p in model.parameters())}


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
    p.add_argument("--variants", default="plain,ours,ours-qat,ours-qat-only")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of the variant list; medians reported")
    p.add_argument("--profile", action="store_true", help="print each variant's top GPU kernels")
    p.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one variant in this process
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/train_step.py needs a CUDA GPU")
    if args.one:
        result = run_variant(args.one, args.config, args.micro_batch, args.steps, args.warmup, args.profile)
        print("RESULT " + json.dumps(result))
        return
    runs = {v: [] for v in args.variants.split(",")}
    for _, variant in itertools.product(range(args.repeats), runs):
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--config", args.config,
                              "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
                              "--warmup", str(args.warmup)] + (["--profile"] if args.profile else []),
                             capture_output=True, text=True)
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
    print(f"\n{'variant':<34}{'ms/step':>9}{'tok/s':>10}{'TFLOP/s':>9}{'peak GiB':>10}{'vs plain':>10}{'vs ours':>9}")
    for r in results:
        if "step_ms" not in r:
            print(f"{r['variant']:<34} failed")
            continue
        rel = lambda k: f"{r['step_ms'] / base[k]['step_ms'] - 1:+.1%}" if k in base else "-"  # noqa: E731
        print(f"{r['variant']:<34}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10.0f}{r['tflops']:>9.1f}"
              f"{r['peak_mem_gib']:>10.2f}{rel('plain'):>10}{rel('ours'):>9}  {r.get('all_step_ms', '')}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
            json.dump({"config": args.config, "micro_batch": args.micro_batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
