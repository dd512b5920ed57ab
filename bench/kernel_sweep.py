"""Launch-setting sweep for the fake-quant, activation + fake-quant backward and kurtosis moments
kernels, on one GPU.

    python bench/kernel_sweep.py    # needs CUDA; JSON to $OUT/kernel_sweep.json if OUT is set

Each setting is checked against the kernel at its default settings (d-input bitwise, clip
gradients and kappa to fp32 rounding) and timed (CUDA-graph replay: GPU time alone) as a fraction
of a device copy of its input, on the same byte counts as bench/kernel_bandwidth.py.
"""
import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/, on sys.path

import torch  # noqa: E402
import triton.testing  # noqa: E402

from kernels import KURTOSIS_EPS  # noqa: E402
from kernels.mlp_act import _backward_triton as _act_backward_triton  # noqa: E402
from kernels.fake_quant import _backward_triton  # noqa: E402
from kernels.kurtosis import _moments_triton  # noqa: E402

TOKENS, BITS = 16384, 4
C_LO, C_HI = -3.8917, 4.1043  # as bench/kernel_bandwidth.py
FQ_HIDDENS, KURT_HIDDENS = (2048, 8192), (1024, 2048, 3072, 4096, 8192)
FQ_SETTINGS = ([dict(block=b, tiles=1, num_warps=w) for b in (2048, 4096, 8192) for w in (4, 8, 16)]
               + [dict(block=4096, tiles=2, num_warps=8), dict(block=4096, tiles=1, num_warps=8, trigger=False)])
ACT_SHAPES = {"gelu": (TOKENS, 8192), "swiglu": (TOKENS, 16384)}   # a's shape, as bench/kernel_bandwidth.py
ACT_SETTINGS = [dict(block=b, tiles=t, num_warps=w, prefetch=p) for b, t in ((1024, 8), (1024, 16), (512, 16),
                                                                             (2048, 8))
                for w in (4, 8) for p in (False, True)]
KURT_SETTINGS = [dict(num_warps=w) for w in (1, 2, 4, 8, 16)]


def _bench(fn):
    """GPU time from CUDA-graph replays: the kernels' speed without the host's launch cost."""
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def _elems_per_thread(n_cols, setting):
    elems = triton.next_power_of_2(n_cols)
    return elems / (32 * setting["num_warps"])


def sweep_fake_quant(hidden, rows):
    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(TOKENS, hidden, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    g = torch.randn(TOKENS, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    clip = torch.tensor([C_LO, C_HI], device="cuda")
    e = x.numel() * x.element_size()
    copy_gbps = 2 * e / _bench(lambda: x.clone()) / 1e6
    ref_dx, ref_clip = _backward_triton(x, g, clip, BITS)
    for setting in [None] + FQ_SETTINGS:
        kw = setting or {}
        dx, dclip = _backward_triton(x, g, clip, BITS, **kw)
        ok = torch.equal(dx, ref_dx) and torch.allclose(dclip, ref_clip, rtol=1e-4, atol=1e-2)
        ms = _bench(lambda: _backward_triton(x, g, clip, BITS, **kw))
        gbps = 3 * e / ms / 1e6
        rows.append(dict(kernel="fake_quant bwd", hidden=hidden, setting=setting or "default",
                         ms=ms, gbps=gbps, vs_copy=gbps / copy_gbps, ok=ok))


def sweep_act(kind, rows):
    swiglu = kind == "swiglu"
    gen = torch.Generator("cuda").manual_seed(0)
    a = (torch.randn(ACT_SHAPES[kind], generator=gen, device="cuda") * 2).to(torch.bfloat16)
    g = torch.randn(a.shape[0], a.shape[1] // (2 if swiglu else 1), generator=gen, device="cuda").to(torch.bfloat16)
    clip = torch.tensor([C_LO, C_HI], device="cuda")
    e = a.numel() * a.element_size()
    moved = 2 * e + g.numel() * g.element_size()
    copy_gbps = 2 * e / _bench(lambda: a.clone()) / 1e6
    ref_da, ref_clip = _act_backward_triton(a, g, clip, BITS, swiglu)
    for setting in [None] + ACT_SETTINGS:
        kw = setting or {}
        if setting and 8 * setting["num_warps"] * 32 > setting["block"] * (2 if swiglu else 1) * 2:
            continue   # fewer than 8 bytes of a per thread
        da, dclip = _act_backward_triton(a, g, clip, BITS, swiglu, **kw)
        ok = torch.equal(da, ref_da) and torch.allclose(dclip, ref_clip, rtol=1e-4, atol=1e-2)
        ms = _bench(lambda: _act_backward_triton(a, g, clip, BITS, swiglu, **kw))
        gbps = moved / ms / 1e6
        rows.append(dict(kernel=f"{kind} bwd", hidden=a.shape[1], setting=setting or "default",
                         ms=ms, gbps=gbps, vs_copy=gbps / copy_gbps, ok=ok))


def sweep_kurtosis(hidden, rows):
    gen = torch.Generator("cuda").manual_seed(0)
    y = torch.randn(TOKENS, hidden, generator=gen, device="cuda")
    y[:, ::97] = y[:, ::97] * 4 + 8
    y = y.to(torch.bfloat16)
    e = y.numel() * y.element_size()
    copy_gbps = 2 * e / _bench(lambda: y.clone()) / 1e6
    ref_kappa, _ = _moments_triton(y, KURTOSIS_EPS)
    for setting in [None] + KURT_SETTINGS:
        kw = setting or {}
        if setting and not 8 <= _elems_per_thread(hidden, setting) <= 128:
            continue
        kappa, _ = _moments_triton(y, KURTOSIS_EPS, **kw)
        ok = torch.allclose(kappa, ref_kappa, rtol=1e-5, atol=0)
        ms = _bench(lambda: _moments_triton(y, KURTOSIS_EPS, **kw))
        gbps = (e + TOKENS * 24) / ms / 1e6
        rows.append(dict(kernel="kurtosis fwd", hidden=hidden, setting=setting or "default",
                         ms=ms, gbps=gbps, vs_copy=gbps / copy_gbps, ok=ok))


def main():
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_sweep.py needs a CUDA GPU")
    rows = []
    for hidden in KURT_HIDDENS:
        sweep_kurtosis(hidden, rows)
    for hidden in FQ_HIDDENS:
        sweep_fake_quant(hidden, rows)
    for kind in ACT_SHAPES:
        sweep_act(kind, rows)
    print(f"{torch.cuda.get_device_name()}, {TOKENS} tokens, bf16")
    for row in rows:
        print(f"{row['kernel']:<15} {row['hidden']:>5} {json.dumps(row['setting']):<62} "
              f"{row['ms']:8.4f} ms {row['gbps']:6.0f} GB/s {row['vs_copy']:5.2f}"
              f"{'' if row['ok'] else '  MISMATCH'}")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "kernel_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
