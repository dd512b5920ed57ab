"""Fused activation + fake quantization vs its PyTorch reference vs float64 (Triton runs under the
interpreter on CPU).

Two fp32 computations of h may differ in the last bits, which moves an element whose grid
coordinate sits on a rounding tie by one grid step: outputs may differ by one step on a tiny
fraction of elements. Under the interpreter fp32 -> bf16 casts truncate instead of rounding to
nearest, so bf16 outputs may also sit one bf16 ulp apart.
"""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.mlp_act import (_activation_torch, _backward_triton, _gated, _load_input,
                             act_fake_quant)
from tests.quant_utils import fake_quant64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["torch", "triton"]
KINDS = ["gelu", "swiglu"]
SHAPES = [(37, 130), (3, 5, 202), (2, 8200)]   # (2, 8200) GELU spans five 4096-element programs
BITS = 4
N_STEPS = 2 ** BITS - 1
CLIP = (-0.13, 1.71)   # GELU's minimum is -0.17: both clips are crossed by both kinds


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _clip(dtype=torch.float32):
    return torch.tensor(CLIP, dtype=dtype, requires_grad=True)


def _clip_values(dtype):
    """(c_lo, c_hi) as the kernels read them: held in `dtype`, widened to fp32."""
    return _clip(dtype).detach().float()


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 2.0 + 0.1).to(dtype)


def _grad_like(x_hat, seed):
    return torch.randn(x_hat.shape, generator=torch.Generator().manual_seed(seed)).to(x_hat.dtype)


def _out_shape(shape, kind):
    return (*shape[:-1], shape[-1] // 2) if kind == "swiglu" else shape


# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------

def _act64(a, kind):
    a = a.double()
    if kind == "gelu":
        return F.gelu(a, approximate="tanh")
    gate, up = a.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


def _surrogate64(h, lo, hi, r, inside, above):
    """The straight-through surrogate clamp(h) + r / s, r = round(z) - z frozen; the clamp's
    branches are given (from the kernels' fp32 h, so that h within rounding of a clip is no flake)."""
    return torch.where(inside, h, torch.where(above, hi, lo)) + r * (hi - lo) / N_STEPS


def _surrogate_grads64(a, kind, g, clip_dtype):
    """(da, dclip by autograd, dclip by central differences) of sum(g * surrogate(act64(a)))."""
    lo32, hi32 = _clip_values(clip_dtype)
    h32 = _activation_torch(a, kind == "swiglu")
    above, below = h32 >= hi32, h32 <= lo32
    inside = ~(above | below)
    assert inside.any() and above.any() and below.any()
    a64 = a.double().requires_grad_()
    clip64 = _clip_values(clip_dtype).double().requires_grad_()
    lo, hi = clip64.unbind()
    h = _act64(a64, kind)
    z = (torch.where(inside, h, torch.where(above, hi, lo)) - lo) * N_STEPS / (hi - lo)
    r = (torch.round(z) - z).detach()
    g = g.double()
    (g * _surrogate64(h, lo, hi, r, inside, above)).sum().backward()

    def loss(lo, hi):
        return (g * _surrogate64(h.detach(), lo, hi, r, inside, above)).sum()

    lo, hi, eps = lo.detach(), hi.detach(), 1e-6
    fd = torch.stack([(loss(lo + eps, hi) - loss(lo - eps, hi)) / (2 * eps),
                      (loss(lo, hi + eps) - loss(lo, hi - eps)) / (2 * eps)])
    return a64.grad, clip64.grad, fd


def _assert_grid_close(out, ref, msg, max_fraction=1e-3):
    """out == ref up to out's dtype (one ulp) and fp32 arithmetic, except on at most
    `max_fraction` of the elements, which may sit one grid step away (rounding ties)."""
    lo, hi = CLIP
    ref = ref.double()
    diff = (out.double() - ref).abs()
    close = _ulp(out.dtype) * ref.abs() + 1e-6
    off = diff > close
    assert (diff[off] <= (hi - lo) / N_STEPS * 1.001 + close[off]).all(), f"{msg}: more than one grid step off"
    assert off.sum() <= 1 + max_fraction * out.numel(), f"{msg}: {off.sum()} elements one grid step off"


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _h_kernel(a_ptr, h_ptr, n, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    """The kernels' pre-quantization h, stored in fp32."""
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    x, up = _load_input(a_ptr, start, n, SWIGLU, BLOCK)
    y, _ = _gated(x, SWIGLU)
    tl.store(h_ptr + offs, y * up, mask=offs < n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_matches_float64(kind, dtype):
    """h before quantization, both implementations, from deep in the negative tail to large inputs."""
    a = torch.cat([_inputs(4000, dtype, seed=1), torch.linspace(-30, 30, 4002).to(dtype)])
    ref = _act64(a, kind)
    h_triton = torch.empty(ref.shape)
    _h_kernel[(triton.cdiv(ref.numel(), 1024),)](a, h_triton, ref.numel(), SWIGLU=kind == "swiglu", BLOCK=1024)
    for impl, h in (("torch", _activation_torch(a, kind == "swiglu")), ("triton", h_triton)):
        assert h.dtype == torch.float32
        torch.testing.assert_close(h.double(), ref, rtol=1e-6, atol=1e-7, msg=lambda m: f"{impl}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_and_float64(shape, dtype, kind):
    a = _inputs(shape, dtype, seed=2)
    ref64 = fake_quant64(_act64(a, kind), _clip_values(torch.float32), BITS)
    outs = {impl: act_fake_quant(a, kind, _clip(), BITS, impl=impl) for impl in IMPLS}
    for impl, out in outs.items():
        assert out.dtype == dtype and out.shape == _out_shape(shape, kind), impl
        _assert_grid_close(out, ref64, f"{impl} vs float64")
    _assert_grid_close(outs["triton"], outs["torch"], "triton vs torch")
    assert ref64.unique().numel() <= 2 ** BITS


def test_forward_counts_clipped():
    for kind in KINDS:
        a = _inputs((2, 8200), torch.float32, seed=3)
        h = _activation_torch(a, kind == "swiglu")
        lo, hi = CLIP
        expected = ((h < lo) | (h > hi)).sum()
        assert 0 < expected < h.numel()
        for impl in IMPLS:
            clipped = torch.zeros((), dtype=torch.int64)
            act_fake_quant(a, kind, _clip(), BITS, impl=impl, clipped=clipped)
            act_fake_quant(a, kind, _clip(), BITS, impl=impl, clipped=clipped)
            assert clipped == 2 * expected, (kind, impl)


def test_forward_saves_only_input_and_clip():
    a = _inputs((5, 64), torch.bfloat16, seed=4).requires_grad_()
    clip = _clip()
    for kind in KINDS:
        for impl in IMPLS:
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                act_fake_quant(a, kind, clip, BITS, impl=impl)
            assert [t.data_ptr() for t in saved] == [a.data_ptr(), clip.data_ptr()], (kind, impl)


def test_non_contiguous_input():
    a = _inputs((130, 37), torch.float32, seed=5).t()
    for kind in KINDS:
        for impl in IMPLS:
            ar = a.detach().requires_grad_()
            out = act_fake_quant(ar, kind, _clip(), BITS, impl=impl)
            torch.testing.assert_close(out, act_fake_quant(a.contiguous(), kind, _clip(), BITS, impl=impl))
            out.sum().backward()
            assert ar.grad.shape == a.shape


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

def _check_backward(a, kind, clip_dtype=torch.float32):
    """Both implementations against the float64 surrogate and each other."""
    g = _grad_like(torch.empty(_out_shape(a.shape, kind), dtype=a.dtype), seed=7)
    ref_da, ref_dclip, fd_dclip = _surrogate_grads64(a, kind, g, clip_dtype)
    da_tol = dict(rtol=max(_ulp(a.dtype), 1e-5), atol=1e-5 * ref_da.abs().max().item())
    clip_tol = 1e-5 * g.double().abs().sum().item() + _ulp(clip_dtype) * ref_dclip.abs().max().item()
    assert (fd_dclip - ref_dclip).abs().max() <= clip_tol
    grads = {}
    for impl in IMPLS:
        ar, clip = a.clone().requires_grad_(), _clip(clip_dtype)
        act_fake_quant(ar, kind, clip, BITS, impl=impl).backward(g)
        assert ar.grad.dtype == a.dtype and clip.grad.dtype == clip_dtype, impl
        torch.testing.assert_close(ar.grad.double(), ref_da, **da_tol, msg=lambda m: f"{impl}: {m}")
        assert (clip.grad.double() - ref_dclip).abs().max() <= clip_tol, (impl, clip.grad, ref_dclip)
        grads[impl] = ar.grad, clip.grad
    torch.testing.assert_close(grads["triton"][0].double(), grads["torch"][0].double(), **da_tol)
    assert (grads["triton"][1].double() - grads["torch"][1].double()).abs().max() <= clip_tol


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_surrogate_float64(shape, dtype, kind):
    _check_backward(_inputs(shape, dtype, seed=6), kind)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_takes_clips_in_the_engines_dtype(kind):
    """bf16 engines hand over bf16 clips: math in fp32, clip gradients back in bf16."""
    _check_backward(_inputs((37, 130), torch.float32, seed=8), kind, clip_dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_many_programs(kind):
    """Hundreds of partial sums over several tiles per program and a ragged last tile, with and
    without the next tile's prefetch and (GELU) bf16 read as 32-bit words."""
    a = _inputs((4001, 6), torch.bfloat16, seed=9)
    g = _grad_like(torch.empty(_out_shape(a.shape, kind), dtype=a.dtype), seed=10)
    clip = _clip()
    ar = a.clone().requires_grad_()
    act_fake_quant(ar, kind, clip, BITS, impl="torch").backward(g)
    tol = 1e-5 * g.double().abs().sum().item()
    for tiles, prefetch, pairs in ((1, False, True), (3, False, True), (3, True, True), (4, True, False)):
        da, dclip = _backward_triton(a, g, clip.detach(), BITS, kind == "swiglu", block=64, tiles=tiles,
                                     prefetch=prefetch, pairs=pairs)
        torch.testing.assert_close(da, ar.grad, rtol=_ulp(a.dtype), atol=1e-5)
        assert (dclip - clip.grad).abs().max() <= tol


@pytest.mark.parametrize("kind", KINDS)
def test_backward_odd_sizes_and_offsets(kind):
    """bf16 inputs that cannot be read as 32-bit words (odd size, odd element offset) take the
    per-element path, with the same results."""
    base = _inputs(2 * 3001 + 2, torch.bfloat16, seed=22)
    for a in (base[:2 * 3001], base[1:2 * 3001 + 1], base[:2 * 3001 - 1 if kind == "gelu" else 2 * 3001]):
        a = a.view(1, -1)
        g = _grad_like(torch.empty(_out_shape(a.shape, kind), dtype=a.dtype), seed=23)
        ref = _backward_triton(a.clone(), g, _clip().detach(), BITS, kind == "swiglu", block=256, pairs=False)
        out = _backward_triton(a, g, _clip().detach(), BITS, kind == "swiglu", block=256)
        assert torch.equal(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5 * g.double().abs().sum().item())


@pytest.mark.parametrize("kind", KINDS)
def test_backward_inverted_clips(kind):
    """No inside elements: da = 0, and each clip gets the gradient beyond it, as in the reference."""
    a = _inputs((37, 130), torch.float32, seed=24)
    g = _grad_like(torch.empty(_out_shape(a.shape, kind)), seed=25)
    for lo, hi in ((1.0, -1.0), (0.5, 0.5)):
        clip = torch.tensor([lo, hi])
        ref = _ref_backward(a, g, clip, kind)
        out = _backward_triton(a, g, clip, BITS, kind == "swiglu")
        assert torch.equal(out[0].abs(), ref[0].abs()) and out[1].isfinite().all()
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5 * g.abs().sum().item())


def _ref_backward(a, g, clip, kind):
    from kernels.mlp_act import _backward_torch
    return _backward_torch(a, g, clip, BITS, kind == "swiglu")


@pytest.mark.parametrize("kind", KINDS)
def test_bitwise_repeatable(kind):
    a = _inputs((3, 12000), torch.bfloat16, seed=11)
    g = _grad_like(torch.empty(_out_shape(a.shape, kind), dtype=a.dtype), seed=12)
    runs = []
    for _ in range(2):
        ar, clip = a.clone().requires_grad_(), _clip()
        out = act_fake_quant(ar, kind, clip, BITS, impl="triton")
        out.backward(g)
        runs.append((out, ar.grad, clip.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_inverted_clips_give_nan():
    a = _inputs((4, 8), torch.float32, seed=13)
    for kind in KINDS:
        for impl in IMPLS:
            clip = torch.tensor([1.0, -1.0])
            assert act_fake_quant(a, kind, clip, BITS, impl=impl).isnan().all(), (kind, impl)


def test_rejects_bad_input():
    a, clip = torch.randn(4, 8), _clip()
    with pytest.raises(TypeError, match="act_fake_quant: input must be a bf16/fp16/fp32"):
        act_fake_quant(a.double(), "gelu", clip, BITS)
    with pytest.raises(ValueError, match="channel"):
        act_fake_quant(a[0, 0], "gelu", clip, BITS)
    with pytest.raises(TypeError, match="shape \\(2,\\)"):
        act_fake_quant(a, "gelu", clip[:1], BITS)
    with pytest.raises(ValueError, match="bits must be an int"):
        act_fake_quant(a, "gelu", clip, 0)
    with pytest.raises(ValueError, match="impl must be one of"):
        act_fake_quant(a, "gelu", clip, BITS, impl="cuda")
    with pytest.raises(TypeError, match="clipped"):
        act_fake_quant(a, "gelu", clip, BITS, clipped=torch.zeros((), dtype=torch.int32))
    with pytest.raises(ValueError, match="kind must be one of"):
        act_fake_quant(a, "relu", clip, BITS)
    with pytest.raises(ValueError, match="even last dim"):
        act_fake_quant(a[:, :7], "swiglu", clip, BITS)
