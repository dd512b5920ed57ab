"""Fused kernels vs their PyTorch references vs float64 (Triton runs under the interpreter on CPU).

Under the interpreter fp32 -> bf16 casts truncate instead of rounding to nearest, so Triton's bf16
outputs may sit one bf16 ulp from the reference; tolerances allow one output ulp.
"""
import pytest
import torch

from kernels import fake_quant, fake_quant_backward, fake_quant_forward
from kernels.fake_quant import _backward_triton, _divider, _sum_partials_kernel
from tests.quant_utils import fake_quant64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["torch", "triton"]
SHAPES = [(37, 129), (3, 5, 200), (4099,)]  # 37*129 and 4099 span two 4096-element fwd programs
BITS = 4


def _tagged(impl):
    """assert_close message prefix naming the implementation that failed."""
    return lambda msg: f"{impl}: {msg}"


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _clip(lo=-1.73, hi=2.41, dtype=torch.float32):  # no rounding ties for bf16 x; ties are tested on their own
    return torch.tensor([lo, hi], dtype=dtype, requires_grad=True)


def _straddling(shape, dtype, seed):
    """Values spread well past both clips, so every branch of the backward is exercised."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2.0 + 0.3).to(dtype)


# ---------------------------------------------------------------------------------------------
# fake_quant: float64 references
# ---------------------------------------------------------------------------------------------

def _surrogate_clip_grads64(x, g, clip, bits, h=1e-6):
    """Float64 central differences of sum(g * (clamp(x, c_lo, c_hi) + r / s)), r frozen."""
    x, g = x.double(), g.double()
    lo0, hi0 = clip.detach().double()
    n = 2 ** bits - 1
    z0 = (torch.clamp(x, lo0, hi0) - lo0) * n / (hi0 - lo0)
    r = torch.round(z0) - z0

    def loss(lo, hi):
        return (g * (torch.clamp(x, lo, hi) + r * (hi - lo) / n)).sum()

    d_lo = (loss(lo0 + h, hi0) - loss(lo0 - h, hi0)) / (2 * h)
    d_hi = (loss(lo0, hi0 + h) - loss(lo0, hi0 - h)) / (2 * h)
    return torch.stack([d_lo, d_hi])


# ---------------------------------------------------------------------------------------------
# fake_quant tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_forward_matches_reference_and_float64(shape, dtype):
    x = _straddling(shape, dtype, seed=1)
    clip = _clip()
    ref64 = fake_quant64(x, clip, BITS)
    outs = {impl: fake_quant_forward(x, clip, BITS, impl=impl) for impl in IMPLS}
    for impl, out in outs.items():
        assert out.dtype == dtype and out.shape == x.shape, impl
        torch.testing.assert_close(out.double(), ref64, rtol=_ulp(dtype), atol=1e-6,
                                   msg=_tagged(impl))
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=_ulp(dtype), atol=0)
    # Only the 16 grid levels come out (up to the output dtype's rounding).
    assert ref64.unique().numel() <= 2 ** BITS


def test_fake_quant_rounds_half_to_even():
    clip = _clip(0.0, 15.0)  # s = 1, so z = x and ties sit on exact half-integers
    x = torch.arange(0.5, 15.0, 1.0)
    for impl in IMPLS:
        out = fake_quant_forward(x, clip, BITS, impl=impl)
        torch.testing.assert_close(out.double(), torch.round(x.double()), rtol=0, atol=0,
                                   msg=_tagged(impl))


def _check_backward(x, g, clip_dtype=torch.float32):
    """Both implementations against the float64 surrogate: dx exactly g inside the clips, clip
    gradients to fp32 accumulation (or the clip dtype's rounding); returns the gradients."""
    lo, hi = _clip(dtype=clip_dtype).tolist()   # as the clip dtype holds them
    xf = x.double()
    inside = (xf > torch.tensor(lo).double()) & (xf < torch.tensor(hi).double())
    assert inside.any() and (~inside).any()
    ref = _surrogate_clip_grads64(x, g, _clip(lo, hi, torch.float64), BITS)
    tol = 1e-5 * g.double().abs().sum().item() + torch.finfo(clip_dtype).eps * ref.abs().max().item()
    grads = {}
    for impl in IMPLS:
        clip = _clip(lo, hi, clip_dtype)
        xr = x.clone().requires_grad_()
        fake_quant(xr, clip, BITS, impl=impl).backward(g)
        grads[impl] = (xr.grad, clip.grad)
        assert xr.grad.dtype == x.dtype and clip.grad.dtype == clip_dtype
        torch.testing.assert_close(xr.grad, torch.where(inside, g, 0).to(x.dtype), rtol=0, atol=0)
        assert (clip.grad.double() - ref).abs().max() <= tol, (impl, clip.grad, ref)
    torch.testing.assert_close(grads["triton"][1], grads["torch"][1], rtol=1e-5, atol=tol)
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_backward_matches_surrogate_float64(shape, dtype):
    x = _straddling(shape, dtype, seed=2)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    _check_backward(x, g)


def test_fake_quant_takes_clips_in_the_engines_dtype():
    """bf16 engines hand the quantizer bf16 clips: math in fp32, clip gradients back in bf16.
    (fp32 inputs: bf16 ones would sit exactly on the bf16 clips, where the surrogate has a kink.)"""
    x = _straddling((37, 129), torch.float32, seed=6)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.dtype)
    _check_backward(x, g, clip_dtype=torch.bfloat16)


def test_fake_quant_reads_strided_rows_in_place():
    """The attention output [b, s, heads, d] seen as [s, b, heads * d]: no copy going in, x_hat
    contiguous, dx back in the input's own layout."""
    gen = torch.Generator().manual_seed(8)
    o = (torch.randn(3, 7, 4, 33, generator=gen) * 2).to(torch.bfloat16)   # [b, s, nh, hd]
    x = o.permute(1, 0, 2, 3).flatten(2)                                    # [s, b, h], a view
    assert not x.is_contiguous() and x.data_ptr() == o.data_ptr()
    g = torch.randn(x.shape, generator=gen).to(x.dtype)
    ref = fake_quant_forward(x.contiguous(), _clip(), BITS, impl="torch")
    for impl in IMPLS:
        out = fake_quant_forward(x, _clip(), BITS, impl=impl)
        assert out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=_ulp(x.dtype), atol=0, msg=_tagged(impl))
    grads = _check_backward(x, g)
    for impl in IMPLS:
        assert grads[impl][0].stride() == x.stride(), impl


def test_fake_quant_counts_clipped_inputs():
    x = _straddling((5, 301), torch.float32, seed=9)
    clip = _clip()
    expected = ((x < clip[0]) | (x > clip[1])).sum()
    for impl in IMPLS:
        clipped = torch.zeros((), dtype=torch.int64)
        fake_quant(x, clip, BITS, impl=impl, clipped=clipped)
        fake_quant_forward(x[:2], clip, BITS, impl=impl, clipped=clipped)
        assert clipped == expected + ((x[:2] < clip[0]) | (x[:2] > clip[1])).sum(), impl


def test_fake_quant_backward_many_programs():
    """Many partial sums over several tiles per program and ragged last tiles, in each of the
    backward's layouts: one flat range, rows of one strided dim, rows of two strided dims."""
    x = _straddling((4001, 5), torch.bfloat16, seed=13)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(14)).to(x.dtype)
    clip = _clip()
    gen = torch.Generator().manual_seed(16)
    wide = _straddling((301, 48), torch.bfloat16, seed=17)
    o = _straddling((3, 67, 2, 24), torch.bfloat16, seed=18)
    cases = {"flat": x, "rows": wide[:, 3:43], "two row dims": o.permute(1, 0, 2, 3).flatten(2)}
    for name, xs in cases.items():
        gs = g if xs is x else torch.randn(xs.shape, generator=gen).to(xs.dtype)
        ref_dx, ref_dclip = fake_quant_backward(xs, gs, clip, BITS, impl="torch")
        tol = 1e-5 * gs.double().abs().sum().item()
        for tiles, block in ((1, 4096), (3, 4096), (2, 256)):
            dx, dclip = _backward_triton(xs, gs, clip.detach(), BITS, tiles=tiles, block=block)
            assert torch.equal(dx, ref_dx) and dx.stride() == ref_dx.stride(), (name, tiles, block)
            assert (dclip - ref_dclip).abs().max() <= tol, (name, tiles, block)


def test_divider_matches_floor_division():
    """The backward's row split r = (i, j) divides by a multiply-high: exact for every int32 r."""
    rows = torch.cat([torch.arange(0, 70000), torch.randint(0, 2 ** 31, (20000,),
                                                            generator=torch.Generator().manual_seed(19)),
                      torch.tensor([2 ** 31 - 1, 2 ** 31 - 2, 2 ** 30, 2 ** 30 - 1])]).tolist()
    for d in [*range(2, 70), 96, 127, 128, 255, 1000, 2048, 4095, 65537, 2 ** 30 + 1, 2 ** 31 - 1]:
        magic, shift = _divider(d)
        assert 0 < magic < 2 ** 32
        extra = [k * d + e for k in (1, 2, 1000, (2 ** 31 - 1) // d) for e in (-1, 0, 1)]
        for r in rows + [v for v in extra if 0 <= v < 2 ** 31]:
            assert ((r * magic) >> 32) >> shift == r // d, (r, d)


def test_sum_partials_loops_over_many_partials():
    """The second stage sums (2, n) partials in several passes of its block."""
    partials = torch.randn(2, 1000, generator=torch.Generator().manual_seed(15))
    out = torch.empty(2)
    _sum_partials_kernel[(1,)](partials, out, partials.shape[1], BLOCK=64)
    torch.testing.assert_close(out, partials.sum(1), rtol=1e-5, atol=1e-5)


def test_fake_quant_backward_bitwise_repeatable():
    x = _straddling((3, 12000), torch.bfloat16, seed=4)  # several programs and partial sums
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype)
    clip = _clip()
    first = fake_quant_backward(x, g, clip, BITS, impl="triton")
    second = fake_quant_backward(x, g, clip, BITS, impl="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(fake_quant_forward(x, clip, BITS, impl="triton"),
                       fake_quant_forward(x, clip, BITS, impl="triton"))


def test_fake_quant_backward_inverted_clips():
    """No inside elements: dx = 0, and each clip gets the gradient of the elements beyond it (those
    between c_hi and c_lo count for both), as in the reference."""
    x = _straddling((37, 129), torch.float32, seed=20)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(21))
    for lo, hi in ((1.0, -1.0), (0.5, 0.5)):
        ref = fake_quant_backward(x, g, _clip(lo, hi), BITS, impl="torch")
        out = fake_quant_backward(x, g, _clip(lo, hi), BITS, impl="triton")
        assert torch.equal(out[0], ref[0]) and out[1].isfinite().all()
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5 * g.abs().sum().item())


def test_fake_quant_inverted_clips_give_nan():
    """No host sync to check c_lo < c_hi: inverted clips poison the output instead."""
    x = torch.randn(4, 8)
    for impl in IMPLS:
        for lo, hi in ((1.0, -1.0), (0.5, 0.5)):
            assert fake_quant_forward(x, _clip(lo, hi), BITS, impl=impl).isnan().all(), impl


def test_fake_quant_rejects_bad_input():
    x = torch.randn(4, 8)
    clip = _clip()
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        fake_quant(x.double(), clip, BITS)
    with pytest.raises(ValueError, match="channel"):
        fake_quant(x[0, 0], clip, BITS)
    with pytest.raises(TypeError, match="shape \\(2,\\)"):
        fake_quant(x, clip[0], BITS)
    with pytest.raises(TypeError, match="clip must be a float"):
        fake_quant(x, clip.double(), BITS)
    with pytest.raises(TypeError, match="clip must be a float"):
        fake_quant(x, torch.tensor([-1.0, 0.0, 1.0])[::2], BITS)
    for bits in (0, 17, 4.0):
        with pytest.raises(ValueError, match="bits must be an int"):
            fake_quant(x, clip, bits)
    with pytest.raises(ValueError, match="impl must be one of"):
        fake_quant(x, clip, BITS, impl="cuda")
    with pytest.raises(ValueError, match="gradient shape"):
        fake_quant_backward(x, x[:2], clip, BITS)
    with pytest.raises(TypeError, match="clipped"):
        fake_quant(x, clip, BITS, clipped=torch.zeros(()))
