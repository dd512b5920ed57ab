"""QAT and kurtosis kernels on one GPU: agreement with their PyTorch references, then bandwidth
against a device copy and time against the plain (unquantized) op they replace.

    python bench/kernel_bandwidth.py             # needs CUDA; JSON to $OUT/kernels.json when OUT is set
    python bench/kernel_bandwidth.py --dry-run   # CPU: the agreement check on small shapes, no timing
                                        # (TRITON_INTERPRET=1 runs the Triton kernels there)

Shapes are the 1b config's per micro-batch (16,384 tokens, hidden 2,048, MLP 8,192, bf16). Every
kernel is memory bound: it is rated in GB/s over the bytes it must move (activation-sized reads
and writes) and as a fraction of what a device copy of the same tensor achieves. The fused
kernels replace a plain op (LayerNorm, GELU, the attention output's layout copy); "vs plain" is
their forward + backward time over that op's, i.e. what QAT adds at that input.
"""
import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# The script's own folder comes first on sys.path, where this file would shadow the package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from kernels import act_fake_quant, fake_quant, norm_fake_quant  # noqa: E402
# the modules, for their host wrappers (the package's names are its public functions)
aq, fq, nq = (importlib.import_module(f"kernels.{m}") for m in ("mlp_act", "fake_quant", "norm_quant"))
from kernels.kurtosis import token_kurtosis_grad, token_kurtosis_stats  # noqa: E402
from tests.quant_utils import fake_quant64  # noqa: E402

TOKENS, HIDDEN, FFN, HEADS, DTYPE, BITS = 16384, 2048, 8192, 16, torch.bfloat16, 4
CLIP = (-3.8917, 4.1043)  # near the paper's +-4, off any bf16 value and rounding tie
EPS = 1e-5


def make_inputs(tokens, hidden, ffn, device):
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(DTYPE)

    batch = 8 if tokens % 8 == 0 else 1
    y = torch.randn(tokens, hidden, generator=gen, device=device)
    y[:, ::97] = y[:, ::97] * 4 + 8                         # outlier channels for the kurtosis
    return {
        "x": randn(tokens, hidden, scale=2.0),             # a residual stream / linear input
        "g": randn(tokens, hidden),                        # its upstream gradient
        "w": (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(DTYPE),
        "a": randn(tokens, ffn, scale=2.0),                # fc1 output
        "g_ffn": randn(tokens, ffn),
        # SDPA's output [b, s, heads, head_dim], seen by proj as [s, b, hidden] in place
        "o": randn(batch, tokens // batch, HEADS, hidden // HEADS, scale=2.0),
        "y": y.to(DTYPE),
        "clip": torch.tensor(CLIP, device=device).to(DTYPE).requires_grad_(),
    }


def _attention_view(o):
    return o.permute(1, 0, 2, 3).flatten(2)


def _grads(fn, inputs, g):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, g)


def _diff(a, b):
    """Largest difference relative to the largest reference value, and the fraction of elements
    that differ at all (quantized outputs may sit one grid step apart near rounding ties)."""
    a, b = a.double(), b.double()
    return {"max_rel": ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item(),
            "frac_diff": (a != b).double().mean().item()}


def check_agreement(inp, impl):
    """Each Triton kernel against its PyTorch reference (outputs and every gradient)."""
    t, clip = inp, inp["clip"].detach()
    view = _attention_view(t["o"])
    cases = {
        "fake_quant": (lambda x, c, i: fake_quant(x, c, BITS, impl=i), [view, clip], t["g"].view(view.shape)),
        "norm_fake_quant": (lambda x, w, c, i: norm_fake_quant(x, w, None, EPS, "layernorm", c, BITS, impl=i),
                            [t["x"], t["w"], clip], t["g"]),
        "act_fake_quant": (lambda a, c, i: act_fake_quant(a, "gelu", c, BITS, impl=i), [t["a"], clip], t["g_ffn"]),
    }
    report = {}
    for name, (fn, inputs, g) in cases.items():
        ref_out, ref_grads = _grads(lambda *xs: fn(*xs, "torch"), inputs, g)
        out, grads = _grads(lambda *xs: fn(*xs, impl), inputs, g)
        report[name] = {"out": _diff(out, ref_out),
                        **{f"d{i}": _diff(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads))}}
    y, g = t["y"], t["g"]
    kappa_ref, stats_ref = token_kurtosis_stats(y, impl="torch")
    kappa, stats = token_kurtosis_stats(y, impl=impl)
    ref_grad = token_kurtosis_grad(y, stats_ref, 1e-3, grad_out=g, impl="torch")
    report["kurtosis"] = {"kappa": _diff(kappa, kappa_ref),
                          "grad+add": _diff(token_kurtosis_grad(y, stats, 1e-3, grad_out=g, impl=impl), ref_grad),
                          "moments+grad+add": _diff(token_kurtosis_grad(y, None, 1e-3, grad_out=g, impl=impl),
                                                    ref_grad)}
    return report


def check_float64(device, impl):
    """Each kernel's forward on odd shapes in fp32 / fp16 / bf16 against the float64 definition:
    the largest error in grid steps (one step where fp32 rounding meets a rounding tie) and the
    fraction of elements off by any step; kurtosis as relative error."""
    gen = torch.Generator(device).manual_seed(1)
    clip = torch.tensor(CLIP, device=device)
    step = (clip[1] - clip[0]).item() / (2 ** BITS - 1)
    report = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(1001, 2050, generator=gen, device=device) * 2).to(dtype)
        w = (1 + 0.1 * torch.randn(2050, generator=gen, device=device)).to(dtype)
        a = (torch.randn(1001, 8200, generator=gen, device=device) * 2).to(dtype)
        x64, w64, a64 = x.double(), w.double(), a.double()
        cases = {
            "fake_quant": (fake_quant(x, clip, BITS, impl=impl), fake_quant64(x64, clip, BITS)),
            "norm_fake_quant": (norm_fake_quant(x, w, None, EPS, "layernorm", clip, BITS, impl=impl),
                                fake_quant64(F.layer_norm(x64, (2050,), w64, None, EPS), clip, BITS)),
            "act_fake_quant gelu": (act_fake_quant(a, "gelu", clip, BITS, impl=impl),
                                    fake_quant64(F.gelu(a64, approximate="tanh"), clip, BITS)),
        }
        for name, (out, ref) in cases.items():
            steps = ((out.double() - ref).abs() / step)
            report[f"{name} {dtype}"] = {"max_steps": round(steps.max().item(), 3),
                                         "frac_off": (steps > 0.5).double().mean().item()}
        kappa, _ = token_kurtosis_stats(x, impl=impl)
        d = x64 - x64.mean(-1, keepdim=True)
        kappa64 = (d ** 4).mean(-1) / ((d ** 2).mean(-1) ** 2 + 1e-20)
        report[f"kurtosis {dtype}"] = {"max_rel": ((kappa.double() - kappa64).abs() / kappa64).max().item()}
    return report


def _bench(fn):
    """(GPU ms, eager ms): the GPU time from CUDA-graph replays (no host launch cost: the kernels'
    own speed) and the time of plain eager calls, which the host's launch cost can bound."""
    eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), eager


def time_kernels(inp):
    """Rows of (name, (GPU ms, eager ms), bytes moved, size of the copy it is rated against,
    the plain op's (GPU ms, eager ms)). The kernels' host wrappers are timed without autograd
    (autograd's backward runs on a stream that CUDA-graph capture cannot follow)."""
    t, clip = inp, inp["clip"].detach()
    x, g, w, a, g_ffn, y = t["x"], t["g"], t["w"], t["a"], t["g_ffn"], t["y"]
    e, e_ffn = x.numel() * x.element_size(), a.numel() * a.element_size()
    view = _attention_view(t["o"])
    g_view = g.view(view.shape)
    rows = []

    def pair(name, fwd, bwd, plain_fwd, plain_bwd, nbytes):
        """A fused kernel pair and the plain op it replaces: fwd reads + writes, bwd reads two and
        writes one activation-sized tensor."""
        rows.append((f"{name} fwd", _bench(fwd), 2 * nbytes, nbytes, _bench(plain_fwd)))
        rows.append((f"{name} bwd", _bench(bwd), 3 * nbytes, nbytes, _bench(plain_bwd)))

    rows.append(("copy 16384x2048", _bench(lambda: x.clone()), 2 * e, e, None))
    rows.append(("copy 16384x8192", _bench(lambda: a.clone()), 2 * e_ffn, e_ffn, None))
    _, mean, rstd = nq._forward_triton(x, w, None, clip, EPS, True, BITS, None)
    _, p_mean, p_rstd = torch.ops.aten.native_layer_norm(x, [x.shape[-1]], w, None, EPS)
    pair("layernorm+fq (qkv, fc1 in)",
         lambda: nq._forward_triton(x, w, None, clip, EPS, True, BITS, None),
         lambda: nq._backward_triton(x, g, w, None, clip, mean, rstd, BITS),
         lambda: torch.ops.aten.native_layer_norm(x, [x.shape[-1]], w, None, EPS),
         lambda: torch.ops.aten.native_layer_norm_backward(g, x, [x.shape[-1]], p_mean, p_rstd, w, None,
                                                           [True, True, False]), e)
    pair("gelu+fq (fc2 in)",
         lambda: aq._forward_triton(a, clip, BITS, False),
         lambda: aq._backward_triton(a, g_ffn, clip, BITS, False),
         lambda: F.gelu(a, approximate="tanh"),
         lambda: torch.ops.aten.gelu_backward(g_ffn, a, approximate="tanh"), e_ffn)
    pair("attn-out fq (proj in)",             # plain: the layout copy proj's input needs, both ways
         lambda: fq._forward_triton(view, clip, BITS),
         lambda: fq._backward_triton(view, g_view, clip, BITS),
         lambda: view.contiguous(), lambda: torch.empty_like(view).copy_(g_view), e)
    for name, src, grad, nbytes in (("fq 16384x2048", x, g, e), ("fq 16384x8192", a, g_ffn, e_ffn)):
        rows.append((f"{name} fwd", _bench(lambda: fq._forward_triton(src, clip, BITS)), 2 * nbytes, nbytes, None))
        rows.append((f"{name} bwd", _bench(lambda: fq._backward_triton(src, grad, clip, BITS)), 3 * nbytes,
                     nbytes, None))
    _, stats = token_kurtosis_stats(y)
    rows.append(("kurtosis stats 16384x2048", _bench(lambda: token_kurtosis_stats(y)), e, e, None))
    rows.append(("kurtosis grad+add 16384x2048",
                 _bench(lambda: token_kurtosis_grad(y, stats, 1e-3, grad_out=g)), 3 * e, e, None))
    rows.append(("kurtosis moments+grad+add 16384x2048",   # stats None: what training runs off log steps
                 _bench(lambda: token_kurtosis_grad(y, None, 1e-3, grad_out=g)), 3 * e, e, None))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: run the agreement check on small CPU shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if not args.dry_run:
            sys.exit("bench/kernel_bandwidth.py needs a CUDA GPU (use --dry-run for the CPU-safe part)")
        impl = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
        report = check_agreement(make_inputs(64, 96, 384, "cpu"), impl)
        print(f"dry run on CPU ({impl} vs torch): {json.dumps(report, indent=1)}")
        print(f"{impl} vs float64: {json.dumps(check_float64('cpu', impl), indent=1)}")
        return

    inp = make_inputs(TOKENS, HIDDEN, FFN, "cuda")
    report = {"device": torch.cuda.get_device_name(), "tokens": TOKENS, "dtype": str(DTYPE), "bits": BITS,
              "agreement": check_agreement(inp, "triton"), "timings": []}
    print(f"Triton vs PyTorch reference: {json.dumps(report['agreement'], indent=1)}")
    report["float64"] = check_float64("cuda", "triton")
    print(f"Triton vs float64 (odd shapes, three dtypes): {json.dumps(report['float64'], indent=1)}")
    rows = time_kernels(inp)
    copy_gbps = {nbytes: moved / ms[0] / 1e6 for name, ms, moved, nbytes, _ in rows if name.startswith("copy")}
    print(f"\n{report['device']}, {TOKENS} tokens, bf16")
    print("GPU ms from CUDA-graph replay; eager ms includes the host's launch cost")
    print(f"{'kernel':<34} {'GPU ms':>8} {'GB/s':>7} {'vs copy':>8} {'plain ms':>9} {'vs plain':>9} "
          f"{'eager ms':>9} {'plain eager':>11}")
    for name, (ms, eager), moved, nbytes, plain in rows:
        gbps = moved / ms / 1e6
        row = {"name": name, "ms": ms, "eager_ms": eager, "bytes": moved, "GB/s": gbps,
               "vs_copy": gbps / copy_gbps[nbytes], "plain_ms": plain and plain[0],
               "plain_eager_ms": plain and plain[1], "vs_plain": ms / plain[0] if plain else None}
        report["timings"].append(row)
        vs_plain = f"{plain[0]:>9.4f} {ms / plain[0]:>9.2f}" if plain else f"{'':>19}"
        plain_eager = f"{plain[1]:>11.4f}" if plain else ""
        print(f"{name:<34} {ms:>8.4f} {gbps:>7.0f} {row['vs_copy']:>8.2f} {vs_plain} {eager:>9.4f} {plain_eager}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
