"""Fused QAT kernels on one GPU: accuracy against float64, then bandwidth against a device copy.

    python bench/kernels.py             # needs CUDA; JSON to $OUT/kernels.json when OUT is set
    python bench/kernels.py --dry-run   # CPU: the accuracy check on a small shape, no timing
                                        # (TRITON_INTERPRET=1 runs the Triton kernels there)

All kernels are memory bound, so each is reported as achieved GB/s over the bytes it must move,
and as a fraction of what a plain device copy of the same tensor achieves.
"""
import argparse
import json
import os
import sys
from pathlib import Path

# The script's own folder comes first on sys.path, where this file would shadow the package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import triton.testing  # noqa: E402

from kernels import KURTOSIS_EPS, fake_quant, fake_quant_backward, fake_quant_forward  # noqa: E402
from kernels import token_kurtosis  # noqa: E402
# The kernels' host wrappers, timed alone: no argument checks, no autograd bookkeeping.
from kernels.fake_quant import _backward_triton, _forward_triton  # noqa: E402
from kernels.kurtosis import _grad_triton, _moments_triton  # noqa: E402

TOKENS, HIDDENS, DTYPE, BITS = 16384, (2048, 8192), torch.bfloat16, 4
# Near the paper's +-4, but with digits that put no bf16 input on a clip (where the eager clamp's
# gradient convention differs from DESIGN.md's) or within fp32 rounding of a rounding tie (where
# fp32 and float64 legitimately pick different levels): round clips such as -3.9, 4.1 do both.
C_LO, C_HI = -3.8917, 4.1043


def naive_fake_quant(x, c_lo, c_hi, bits):
    """QAT as written in eager PyTorch: the straight-through surrogate, differentiated by autograd.
    In float64 it is also the accuracy reference."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    s = (2 ** bits - 1) / (c_hi - c_lo)
    xc = torch.clamp(xf, c_lo, c_hi)
    z = (xc - c_lo) * s
    return (xc + (torch.round(z) - z).detach() / s).to(x.dtype)


def naive_kurtosis(y):
    """Per-token kurtosis in eager PyTorch; in float64 the accuracy reference."""
    yf = y.to(torch.promote_types(y.dtype, torch.float32))
    d = yf - yf.mean(-1, keepdim=True)
    m2 = (d * d).mean(-1)
    return (d ** 4).mean(-1) / (m2 * m2 + KURTOSIS_EPS)


def make_inputs(tokens, hidden, device):
    """Activations straddling the clips, a few shifted outlier channels, and upstream gradients."""
    gen = torch.Generator(device).manual_seed(0)
    x = (torch.randn(tokens, hidden, generator=gen, device=device) * 2).to(DTYPE)
    y = torch.randn(tokens, hidden, generator=gen, device=device)
    y[:, ::97] = y[:, ::97] * 4 + 8
    g = torch.randn(tokens, hidden, generator=gen, device=device).to(DTYPE)
    g_kappa = torch.randn(tokens, generator=gen, device=device)
    c_lo = torch.tensor(C_LO, device=device, requires_grad=True)
    c_hi = torch.tensor(C_HI, device=device, requires_grad=True)
    return x, y.to(DTYPE), g, g_kappa, c_lo, c_hi


def _rel(a, ref):
    """Max error relative to the largest reference magnitude."""
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def check_accuracy(tokens, hidden, device, impl):
    """Max relative errors of each kernel output against the float64 formulation."""
    x, y, g, g_kappa, c_lo, c_hi = make_inputs(tokens, hidden, device)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, c_lo, c_hi)]
    x_hat64 = naive_fake_quant(*leaves64, BITS)
    dx64, dlo64, dhi64 = torch.autograd.grad(x_hat64, leaves64, g.double())
    y64 = y.double().requires_grad_()
    kappa64 = naive_kurtosis(y64)
    (dy64,) = torch.autograd.grad(kappa64, y64, g_kappa.double())

    x_hat = fake_quant_forward(x, c_lo, c_hi, BITS, impl=impl)
    dx, dlo, dhi = fake_quant_backward(x, g, c_lo, c_hi, BITS, impl=impl)
    y_req = y.clone().requires_grad_()
    kappa = token_kurtosis(y_req, impl=impl)
    (dy,) = torch.autograd.grad(kappa, y_req, g_kappa)
    return {
        "fake_quant_fwd": _rel(x_hat, x_hat64.detach()),
        "fake_quant_dx": _rel(dx, dx64),
        "fake_quant_dc_lo": _rel(dlo, dlo64),
        "fake_quant_dc_hi": _rel(dhi, dhi64),
        "kurtosis_fwd": ((kappa.double() - kappa64.detach()) / kappa64.detach()).abs().max().item(),
        "kurtosis_bwd": _rel(dy, dy64),
    }


def _fwd_bwd(fn, inputs, grad):
    """One training-style step of fn: forward, then autograd.grad into every input."""
    def step():
        torch.autograd.grad(fn(*inputs), inputs, grad)
    return step


def time_kernels(hidden):
    """(name, median ms, bytes that must move) for every timed variant at this hidden size."""
    x, y, g, g_kappa, c_lo, c_hi = make_inputs(TOKENS, hidden, "cuda")
    e = x.numel() * x.element_size()  # bytes of one activation tensor
    stats = TOKENS * 4 * 6  # fp32 per token: fwd writes kappa + 5 stats, bwd reads them + g_kappa
    _, kurt_stats = _moments_triton(y, KURTOSIS_EPS)
    x_req, y_req = x.clone().requires_grad_(), y.clone().requires_grad_()
    fq_inputs, kurt_inputs = [x_req, c_lo, c_hi], [y_req]
    fq_pair, kurt_pair = 5 * e, 3 * e + 2 * stats  # bytes a fused forward + backward must move

    def fused_fq(x_, lo, hi):
        return fake_quant(x_, lo, hi, BITS)

    def eager_fq(x_, lo, hi):
        return naive_fake_quant(x_, lo, hi, BITS)

    variants = [
        # name, callable, bytes: reads + writes of activation-sized tensors
        ("copy", lambda: x.clone(), 2 * e),  # read x, write the copy
        # Kernels alone. x -> x_hat; x, g -> dx (+ 8 bytes of partial sums per 4096 elements);
        # y -> kappa + stats; y, stats, g -> dy.
        ("fake_quant fwd", lambda: _forward_triton(x, c_lo, c_hi, BITS), 2 * e),
        ("fake_quant bwd", lambda: _backward_triton(x, g, c_lo, c_hi, BITS), 3 * e),
        ("kurtosis fwd", lambda: _moments_triton(y, KURTOSIS_EPS), e + stats),
        ("kurtosis bwd", lambda: _grad_triton(y, kurt_stats, g_kappa), 2 * e + stats),
        # Forward + backward through autograd, all rated on the bytes of the fused pair.
        ("fake_quant fwd+bwd fused", _fwd_bwd(fused_fq, fq_inputs, g), fq_pair),
        ("fake_quant fwd+bwd eager", _fwd_bwd(eager_fq, fq_inputs, g), fq_pair),
        ("fake_quant fwd+bwd compile", _fwd_bwd(torch.compile(eager_fq), fq_inputs, g), fq_pair),
        ("kurtosis fwd+bwd fused", _fwd_bwd(token_kurtosis, kurt_inputs, g_kappa), kurt_pair),
        ("kurtosis fwd+bwd eager", _fwd_bwd(naive_kurtosis, kurt_inputs, g_kappa), kurt_pair),
        ("kurtosis fwd+bwd compile",
         _fwd_bwd(torch.compile(naive_kurtosis), kurt_inputs, g_kappa), kurt_pair),
    ]
    return [(name, triton.testing.do_bench(fn, return_mode="median"), nbytes)
            for name, fn, nbytes in variants]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: run the accuracy check on a small CPU shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if not args.dry_run:
            sys.exit("bench/kernels.py needs a CUDA GPU (use --dry-run for the CPU-safe part)")
        impl = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
        errors = check_accuracy(64, 264, "cpu", impl)
        print(f"dry run on CPU ({impl}): max rel errors vs float64 {json.dumps(errors, indent=1)}")
        print("timing skipped: no CUDA device")
        return

    report = {"device": torch.cuda.get_device_name(), "tokens": TOKENS, "dtype": str(DTYPE),
              "bits": BITS, "accuracy": {}, "timings": []}
    for hidden in HIDDENS:
        errors = check_accuracy(TOKENS, hidden, "cuda", impl=None)
        report["accuracy"][hidden] = errors
        print(f"hidden {hidden}: max rel errors vs float64 {json.dumps(errors)}")
        torch.cuda.empty_cache()
        timings = time_kernels(hidden)
        copy_gbps = timings[0][2] / timings[0][1] / 1e6
        for name, ms, nbytes in timings:
            gbps = nbytes / ms / 1e6
            report["timings"].append({"hidden": hidden, "name": name, "ms": ms, "bytes": nbytes,
                                      "GB/s": gbps, "vs_copy": gbps / copy_gbps})
        torch.cuda.empty_cache()

    print(f"\n{report['device']}, {TOKENS} tokens, bf16")
    print(f"{'hidden':>6}  {'variant':<28} {'ms':>8} {'GB/s':>8} {'vs copy':>8}")
    for row in report["timings"]:
        print(f"{row['hidden']:>6}  {row['name']:<28} {row['ms']:>8.4f} {row['GB/s']:>8.0f} "
              f"{row['vs_copy']:>8.2f}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
