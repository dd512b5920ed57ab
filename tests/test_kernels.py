"""Fused kernels vs their PyTorch references vs float64 (Triton runs under the interpreter on CPU).

Under the interpreter fp32 -> bf16 casts truncate instead of rounding to nearest, so Triton's bf16
outputs may sit one bf16 ulp from the reference; tolerances allow one output ulp.
"""
import pytest
import torch

from kernels import fake_quant, fake_quant_backward, fake_quant_forward
from kernels.fake_quant import _backward_triton, _sum_partials_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["torch", "triton"]
SHAPES = [(37, 129), (3, 5, 200), (4099,)]  # 37*129 and 4099 span two 4096-element fwd programs
BITS = 4


def _tagged(impl):
    """assert_close message prefix naming the implementation that failed."""
    return lambda msg: f"{impl}: {msg}"


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _clips(lo=-1.73, hi=2.41):  # no rounding ties for bf16 x; ties are tested on their own
    return (torch.tensor(lo, requires_grad=True), torch.tensor(hi, requires_grad=True))


def _straddling(shape, dtype, seed):
    """Values spread well past both clips, so every branch of the backward is exercised."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2.0 + 0.3).to(dtype)


# ---------------------------------------------------------------------------------------------
# fake_quant: float64 references
# ---------------------------------------------------------------------------------------------

def _fake_quant64(x, c_lo, c_hi, bits):
    x, c_lo, c_hi = x.double(), c_lo.detach().double(), c_hi.detach().double()
    s = (2 ** bits - 1) / (c_hi - c_lo)
    z = (torch.clamp(x, c_lo, c_hi) - c_lo) * s
    return torch.round(z) / s + c_lo


def _surrogate_clip_grads64(x, g, c_lo, c_hi, bits, h=1e-6):
    """Float64 central differences of sum(g * (clamp(x, c_lo, c_hi) + r / s)), r frozen."""
    x, g = x.double(), g.double()
    lo0, hi0 = c_lo.detach().double(), c_hi.detach().double()
    n = 2 ** bits - 1
    z0 = (torch.clamp(x, lo0, hi0) - lo0) * n / (hi0 - lo0)
    r = torch.round(z0) - z0

    def loss(lo, hi):
        return (g * (torch.clamp(x, lo, hi) + r * (hi - lo) / n)).sum()

    d_lo = (loss(lo0 + h, hi0) - loss(lo0 - h, hi0)) / (2 * h)
    d_hi = (loss(lo0, hi0 + h) - loss(lo0, hi0 - h)) / (2 * h)
    return d_lo, d_hi


# ---------------------------------------------------------------------------------------------
# fake_quant tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_forward_matches_reference_and_float64(shape, dtype):
    x = _straddling(shape, dtype, seed=1)
    c_lo, c_hi = _clips()
    ref64 = _fake_quant64(x, c_lo, c_hi, BITS)
    outs = {impl: fake_quant_forward(x, c_lo, c_hi, BITS, impl=impl) for impl in IMPLS}
    for impl, out in outs.items():
        assert out.dtype == dtype and out.shape == x.shape, impl
        torch.testing.assert_close(out.double(), ref64, rtol=_ulp(dtype), atol=1e-6,
                                   msg=_tagged(impl))
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=_ulp(dtype), atol=0)
    # Only the 16 grid levels come out (up to the output dtype's rounding).
    assert ref64.unique().numel() <= 2 ** BITS


def test_fake_quant_rounds_half_to_even():
    c_lo, c_hi = _clips(0.0, 15.0)  # s = 1, so z = x and ties sit on exact half-integers
    x = torch.arange(0.5, 15.0, 1.0)
    for impl in IMPLS:
        out = fake_quant_forward(x, c_lo, c_hi, BITS, impl=impl)
        torch.testing.assert_close(out.double(), torch.round(x.double()), rtol=0, atol=0,
                                   msg=_tagged(impl))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_backward_matches_surrogate_float64(shape, dtype):
    x = _straddling(shape, dtype, seed=2)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    xf, lo, hi = x.double(), -1.73, 2.41
    inside = (xf > torch.tensor(lo).double()) & (xf < torch.tensor(hi).double())
    assert inside.any() and (~inside).any()
    ref_lo, ref_hi = _surrogate_clip_grads64(x, g, *_clips(lo, hi), BITS)
    tol = 1e-5 * g.double().abs().sum().item()  # fp32 accumulation over the whole tensor
    grads = {}
    for impl in IMPLS:
        c_lo, c_hi = _clips(lo, hi)
        xr = x.clone().requires_grad_()
        fake_quant(xr, c_lo, c_hi, BITS, impl=impl).backward(g)
        grads[impl] = (xr.grad, c_lo.grad, c_hi.grad)
        assert xr.grad.dtype == dtype and c_lo.grad.dtype == torch.float32
        torch.testing.assert_close(xr.grad, torch.where(inside, g, 0).to(dtype), rtol=0, atol=0)
        assert abs(c_lo.grad.item() - ref_lo.item()) <= tol, (impl, c_lo.grad, ref_lo)
        assert abs(c_hi.grad.item() - ref_hi.item()) <= tol, (impl, c_hi.grad, ref_hi)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)


def test_fake_quant_backward_many_programs():
    """Hundreds of partial sums and a ragged last block, at a small block size."""
    x = _straddling((5, 4001), torch.bfloat16, seed=13)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(14)).to(x.dtype)
    c_lo, c_hi = _clips()
    ref_dx, ref_lo, ref_hi = fake_quant_backward(x, g, c_lo, c_hi, BITS, impl="torch")
    dx, dc_lo, dc_hi = _backward_triton(x, g, c_lo, c_hi, BITS, block=64)
    assert torch.equal(dx, ref_dx)
    tol = 1e-5 * g.double().abs().sum().item()
    assert abs(dc_lo.item() - ref_lo.item()) <= tol and abs(dc_hi.item() - ref_hi.item()) <= tol


def test_sum_partials_loops_over_many_partials():
    """The second stage sums (2, n) partials in several passes of its block."""
    partials = torch.randn(2, 1000, generator=torch.Generator().manual_seed(15))
    out = torch.empty(2)
    _sum_partials_kernel[(1,)](partials, out, partials.shape[1], BLOCK=64)
    torch.testing.assert_close(out, partials.sum(1), rtol=1e-5, atol=1e-5)


def test_fake_quant_backward_bitwise_repeatable():
    x = _straddling((3, 12000), torch.bfloat16, seed=4)  # several programs and partial sums
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype)
    c_lo, c_hi = _clips()
    first = fake_quant_backward(x, g, c_lo, c_hi, BITS, impl="triton")
    second = fake_quant_backward(x, g, c_lo, c_hi, BITS, impl="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(fake_quant_forward(x, c_lo, c_hi, BITS, impl="triton"),
                       fake_quant_forward(x, c_lo, c_hi, BITS, impl="triton"))


def test_fake_quant_rejects_bad_input():
    x = torch.randn(4, 8)
    c_lo, c_hi = _clips()
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        fake_quant(x.double(), c_lo, c_hi, BITS)
    with pytest.raises(TypeError, match="c_lo must be a 0-dim fp32"):
        fake_quant(x, c_lo.double(), c_hi, BITS)
    with pytest.raises(TypeError, match="c_hi must be a 0-dim fp32"):
        fake_quant(x, c_lo, torch.tensor([2.0]), BITS)
    for bits in (0, 17, 4.0):
        with pytest.raises(ValueError, match="bits must be an int"):
            fake_quant(x, c_lo, c_hi, bits)
    with pytest.raises(ValueError, match="c_lo < c_hi"):
        fake_quant(x, c_hi.detach().clone(), c_lo.detach().clone(), BITS)
    with pytest.raises(ValueError, match="impl must be one of"):
        fake_quant(x, c_lo, c_hi, BITS, impl="cuda")
    with pytest.raises(ValueError, match="gradient shape"):
        fake_quant_backward(x, x[:2], c_lo, c_hi, BITS)
