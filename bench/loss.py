"""The LM loss on one GPU, forward + backward: `kernels.cross_entropy` (what lm_loss runs) against
megatron-core's vocab_parallel_cross_entropy on logits.float() (what it ran before) and
F.cross_entropy on logits.float() eager and under torch.compile (the plain references).

    python bench/loss.py [--tokens 16384] [--vocab 32768]    # JSON to $OUT/loss.json when OUT is set

The default shape is a micro-batch of the 1b config (8 x 2048 tokens) and of the 125m bench (16 x
1024), vocabulary 32768, bf16 logits. Each variant reports the median ms of forward + backward
(triton.testing.do_bench, less the logits' copy each call makes) and the peak memory above the
logits it was given: what the loss adds at the start of the model's backward, where a step's peak sits.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import quiet  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from kernels import cross_entropy  # noqa: E402


def _megatron(logits, labels):
    from megatron.core import tensor_parallel
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def _plain(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")


VARIANTS = {"ours": cross_entropy, "megatron": _megatron, "plain": _plain,
            "plain-compile": torch.compile(_plain)}


def measure(fn, x, labels):
    """(median ms of forward + backward, peak GiB above the inputs, the mean loss)."""
    def run(logits):
        loss = fn(logits, labels).mean()
        loss.backward()
        return loss

    copy = lambda: x.detach().clone().requires_grad_()  # noqa: E731  (lm_loss's backward overwrites its logits)
    clone_ms = triton.testing.do_bench(copy, warmup=10, rep=100, return_mode="median")
    ms = triton.testing.do_bench(lambda: run(copy()), warmup=10, rep=100, return_mode="median") - clone_ms
    logits = copy()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = run(logits)
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 30, loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[16384])
    p.add_argument("--vocab", type=int, default=32768)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/loss.py needs a CUDA GPU (tests/test_cross_entropy.py checks the math on CPU)")
    # megatron's loss reads its TP group from parallel_state: one process, TP = 1.
    from megatron.core import parallel_state
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    results = []
    for tokens in args.tokens:
        gen = torch.Generator("cuda").manual_seed(0)
        x = (torch.randn(tokens, 1, args.vocab, device="cuda", generator=gen) * 3).bfloat16()
        labels = torch.randint(args.vocab, (tokens, 1), device="cuda", generator=gen)
        for name, fn in VARIANTS.items():
            ms, gib, loss = measure(fn, x, labels)
            results.append({"variant": name, "tokens": tokens, "vocab": args.vocab, "ms": ms, "peak_gib": gib,
                            "loss": loss})
        ours = next(r for r in results if r["tokens"] == tokens and r["variant"] == "ours")
        print(f"\n{tokens} tokens x {args.vocab} vocabulary, bf16 logits ({x.numel() * 2 / 2 ** 30:.2f} GiB)")
        print(f"{'variant':<16}{'fwd+bwd ms':>11}{'vs ours':>9}{'peak GiB':>10}{'loss':>10}")
        for r in results[-len(VARIANTS):]:
            print(f"{r['variant']:<16}{r['ms']:>11.3f}{r['ms'] / ours['ms']:>9.2f}{r['peak_gib']:>10.2f}{r['loss']:>10.5f}")
    device = torch.cuda.get_device_name()
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "loss.json"
        path.write_text(json.dumps({"device": device, "results": results}, indent=1))
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
