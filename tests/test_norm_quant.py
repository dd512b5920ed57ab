"""norm_fake_quant: Triton kernels vs the PyTorch reference vs float64 (Triton runs under the
interpreter on CPU, where fp32 -> bf16 casts truncate: outputs may sit one output ulp apart).

Quantized outputs may also differ by one grid step where y sits within fp32 rounding of a rounding
tie (the implementations sum the row statistics in different orders); that must stay rare.
"""
import pytest
import torch
import torch.nn.functional as F
import triton

from kernels.norm_quant import (_affine_torch, _backward_triton, _column_sums_kernel,
                                _forward_triton, _stats_torch, norm_fake_quant)
from tests.quant_utils import fake_quant64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["torch", "triton"]
SHAPES = [(37, 129), (3, 5, 200), (2, 4100), (6, 128)]  # the last: no column mask
NORMS = [("layernorm", True), ("layernorm", False), ("rmsnorm", False)]  # (kind, with bias)
BITS, EPS = 4, 1e-5
C_LO, C_HI = -1.73, 2.41
MAX_STEP_FRACTION = 1e-3  # elements allowed one grid step off (near rounding ties)


def _inputs(shape, dtype, kind, with_bias, seed, param_dtype=torch.float32):
    """Rows of varied offset and scale; weight and bias that push y well past both clips."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    offset = torch.randn(*shape[:-1], 1, generator=gen) * 2
    scale = 0.5 + 3 * torch.rand(*shape[:-1], 1, generator=gen)
    x = (torch.randn(shape, generator=gen) * scale + offset).to(dtype)
    weight = (0.5 + torch.rand(n, generator=gen)).to(param_dtype)
    bias = (torch.randn(n, generator=gen) * 0.3).to(param_dtype) if with_bias else None
    g = torch.randn(shape, generator=gen).to(dtype)
    return x, weight, bias, g


def _clip(dtype=torch.float32):
    return torch.tensor([C_LO, C_HI], dtype=dtype)


def _step(clip):
    lo, hi = clip.double().tolist()
    return (hi - lo) / (2 ** BITS - 1)


def _run(impl, x, weight, bias, kind, clip, g=None, clipped=None):
    """x_hat and, given g, the gradients (dx, dw, db, dclip) of sum(g * x_hat)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias, clip)]
    out = norm_fake_quant(leaves[0], leaves[1], leaves[2], EPS, kind, leaves[3], BITS, impl=impl,
                          clipped=clipped)
    if g is None:
        return out
    out.backward(g)
    return out, [t.grad if t is not None else None for t in leaves]


# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------

def _norm64(x, weight, bias, kind):
    """y in float64 by torch's own norms (differentiable)."""
    n, x, w = (x.shape[-1],), x.double(), weight.double()
    if kind == "rmsnorm":
        return F.rms_norm(x, n, w, EPS)
    return F.layer_norm(x, n, w, bias.double() if bias is not None else None, EPS)


def _y32(x, weight, bias, kind):
    """y as the reference computes it in fp32 (rows flattened)."""
    v = x.reshape(-1, x.shape[-1]).float()
    mean, rstd = _stats_torch(v, EPS, kind == "layernorm")
    return _affine_torch(v, mean, rstd, weight, bias)[1].view(x.shape)


def _decisions32(x, weight, bias, kind, clip):
    """(above, below, round(z)) from the fp32 y: the float64 surrogate takes its branches and
    rounding from these, so the comparison does not hinge on fp32 rounding near a clip or tie."""
    y = _y32(x, weight, bias, kind)
    lo, hi = clip.float()
    z = (torch.clamp(y, lo, hi) - lo) * ((2 ** BITS - 1) / (hi - lo))
    return y >= hi, y <= lo, torch.round(z).double()


def _surrogate_grads64(x, weight, bias, kind, clip, g):
    """(dx, dw, db, dclip): float64 autograd of sum(g * (clamp(y) + r / s)) with the rounding
    residual r = round(z) - z held constant (DESIGN.md), y the float64 norm."""
    above, below, k = _decisions32(x, weight, bias, kind, clip)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, weight, bias, clip)]
    xd, wd, bd, cd = leaves
    y = _norm64(xd, wd, bd, kind)
    lo, hi = cd[0], cd[1]
    y_clamped = torch.where(above, hi, torch.where(below, lo, y))
    s = (2 ** BITS - 1) / (hi - lo)
    x_hat = y_clamped + (k - (y_clamped - lo) * s).detach() / s
    (x_hat * g.double()).sum().backward()
    return [t.grad if t is not None else None for t in leaves]


def _clip_grads_fd64(x, weight, bias, kind, clip, g, h=1e-6):
    """Float64 central differences of the same surrogate in the clips, r frozen at the
    unperturbed clips' value."""
    y = _norm64(x, weight, bias, kind)
    g = g.double()
    lo0, hi0 = clip.double()
    n = 2 ** BITS - 1
    _, _, k = _decisions32(x, weight, bias, kind, clip)
    r = k - (torch.clamp(y, lo0, hi0) - lo0) * n / (hi0 - lo0)

    def loss(lo, hi):
        return (g * (torch.clamp(y, lo, hi) + r * (hi - lo) / n)).sum()

    return torch.stack([(loss(lo0 + h, hi0) - loss(lo0 - h, hi0)) / (2 * h),
                        (loss(lo0, hi0 + h) - loss(lo0, hi0 - h)) / (2 * h)])


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

def _assert_on_grid(out, ref, step, dtype, what):
    """out equals ref up to the output dtype's rounding, except a rare element one grid step off."""
    out, ref = out.double(), ref.double()
    tol = torch.finfo(dtype).eps * ref.abs() + 1e-6
    off = (out - ref).abs() > tol
    assert ((out - ref).abs() <= step + 2 * tol).all(), what
    assert off.sum() <= MAX_STEP_FRACTION * out.numel(), (what, off.sum().item())


def _assert_sum_close(got, ref, bound, dtype, what, rel=1e-6):
    """A sum of fp32 terms, to `rel` of the sum of their magnitudes, stored in `dtype`."""
    err = (got.double() - ref.double()).abs()
    allowed = rel * bound + torch.finfo(dtype).eps * ref.double().abs()
    assert (err <= allowed).all(), (what, (err - allowed).max().item())


def _check_grads(grads, ref, x, weight, bias, kind, clip, g, what):
    dx, dw, db, dclip = grads
    rdx, rdw, rdb, rdclip = ref
    assert dx.dtype == x.dtype and dx.shape == x.shape, what
    torch.testing.assert_close(dx.double(), rdx, rtol=torch.finfo(x.dtype).eps,
                               atol=1e-5 * rdx.abs().max().item(), msg=lambda m: f"{what} dx: {m}")
    n = x.shape[-1]
    g_abs = g.double().abs().reshape(-1, n)
    xnorm_abs = _norm64(x, torch.ones(n), None, kind).abs().reshape(-1, n)
    assert dw.dtype == weight.dtype
    # dw's terms carry xnorm's fp32 error, ~1e-6 relative (more where x is near the row mean)
    _assert_sum_close(dw, rdw, (g_abs * xnorm_abs).sum(0), weight.dtype, f"{what} dw", rel=1e-5)
    if bias is not None:
        assert db.dtype == bias.dtype
        _assert_sum_close(db, rdb, g_abs.sum(0), bias.dtype, f"{what} db")
    else:
        assert db is None
    assert dclip.dtype == clip.dtype
    _assert_sum_close(dclip, rdclip, g_abs.sum(), clip.dtype, f"{what} dclip")


def _check_backward(x, weight, bias, g, kind, clip):
    """Both implementations against the float64 surrogate (and its finite differences in the
    clips), and against each other."""
    ref = _surrogate_grads64(x, weight, bias, kind, clip, g)
    fd = _clip_grads_fd64(x, weight, bias, kind, clip, g)
    tol = 1e-6 * g.double().abs().sum() + torch.finfo(clip.dtype).eps * fd.abs().max()
    assert (ref[3] - fd).abs().max() <= 1e-8 * g.double().abs().sum(), (ref[3], fd)
    grads = {}
    for impl in IMPLS:
        _, grads[impl] = _run(impl, x, weight, bias, kind, clip, g)
        _check_grads(grads[impl], ref, x, weight, bias, kind, clip, g, impl)
        assert (grads[impl][3].double() - fd).abs().max() <= tol, (impl, grads[impl][3], fd)
    torch_grads = [t.double() if t is not None else None for t in grads["torch"]]
    _check_grads(grads["triton"], torch_grads, x, weight, bias, kind, clip, g, "triton vs torch")


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,with_bias", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_and_float64(shape, dtype, kind, with_bias):
    x, weight, bias, _ = _inputs(shape, dtype, kind, with_bias, seed=1)
    clip = _clip()
    y64 = _norm64(x, weight, bias, kind)
    torch.testing.assert_close(_y32(x, weight, bias, kind).double(), y64, rtol=1e-5, atol=1e-5)
    ref64 = fake_quant64(y64, clip, BITS)
    assert (ref64 == clip.double()[0]).any() and (ref64 == clip.double()[1]).any()
    outs = {impl: _run(impl, x, weight, bias, kind, clip) for impl in IMPLS}
    for impl, out in outs.items():
        assert out.dtype == dtype and out.shape == x.shape, impl
        _assert_on_grid(out, ref64, _step(clip), dtype, f"{impl} vs float64")
    _assert_on_grid(outs["triton"], outs["torch"], _step(clip), dtype, "triton vs torch")


@pytest.mark.parametrize("kind,with_bias", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_surrogate_float64(shape, dtype, kind, with_bias):
    x, weight, bias, g = _inputs(shape, dtype, kind, with_bias, seed=2)
    _check_backward(x, weight, bias, g, kind, _clip())


@pytest.mark.parametrize("kind,with_bias", NORMS)
def test_bf16_parameters_and_clips(kind, with_bias):
    """A bf16 engine hands over bf16 weight, bias and clips: math in fp32, gradients in bf16."""
    x, weight, bias, g = _inputs((37, 129), torch.bfloat16, kind, with_bias, seed=3,
                                 param_dtype=torch.bfloat16)
    _check_backward(x, weight, bias, g, kind, _clip(torch.bfloat16))


@pytest.mark.parametrize("kind,with_bias", NORMS)
def test_many_programs_and_ragged_tiles(kind, with_bias):
    """Several programs of rows_per_program rows, which ROWS does not divide, and a ragged last
    program: Triton vs the reference, and bitwise repeatable."""
    x, weight, bias, g = _inputs((301, 7), torch.bfloat16, kind, with_bias, seed=4)
    clip = _clip()
    x_hat, mean, rstd = _forward_triton(x, weight, bias, clip, EPS, kind == "layernorm", BITS, None,
                                        rows=4)
    assert torch.equal(_forward_triton(x, weight, bias, clip, EPS, kind == "layernorm", BITS, None,
                                       rows=4)[0], x_hat)
    ref_out, ref = _run("torch", x, weight, bias, kind, clip, g)
    _assert_on_grid(x_hat, ref_out, _step(clip), x.dtype, "forward")
    first = _backward_triton(x, g, weight, bias, clip, mean, rstd, BITS, rows=8, rows_per_program=12)
    second = _backward_triton(x, g, weight, bias, clip, mean, rstd, BITS, rows=8, rows_per_program=12)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)
    ref = [t.double() if t is not None else None for t in ref]
    _check_grads(first, ref, x, weight, bias, kind, clip, g, "triton vs torch")


@pytest.mark.parametrize("with_bias", [True, False])
def test_column_sums_loop_over_many_partials(with_bias):
    """The second stage sums (programs, width) partials in several steps of its tile and splits
    the columns into dw, db and dclip, each in its own dtype."""
    n = 5
    width = (2 if with_bias else 1) * n + 2
    part = torch.randn(300, width, generator=torch.Generator().manual_seed(10))
    dw, db, dclip = torch.empty(n, dtype=torch.bfloat16), torch.empty(n), torch.empty(2)
    _column_sums_kernel[(triton.cdiv(width, 4),)](part, dw, db, dclip, part.shape[0], n, width,
                                                  HAS_BIAS=with_bias, ROWS=16, BLOCK=4)
    total = part.sum(0)
    torch.testing.assert_close(dw, total[:n].to(dw.dtype))
    if with_bias:
        torch.testing.assert_close(db, total[n:2 * n])
    torch.testing.assert_close(dclip, total[-2:])


def test_default_launch_bitwise_repeatable():
    x, weight, bias, g = _inputs((3, 2000), torch.bfloat16, "layernorm", True, seed=5)
    first = _run("triton", x, weight, bias, "layernorm", _clip(), g)
    second = _run("triton", x, weight, bias, "layernorm", _clip(), g)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_counts_clipped_outputs():
    clip = _clip()
    for kind, with_bias in NORMS:
        x, weight, bias, _ = _inputs((5, 301), torch.float32, kind, with_bias, seed=6)
        y = _y32(x, weight, bias, kind)
        expected = ((y < C_LO) | (y > C_HI)).sum() + ((y[:2] < C_LO) | (y[:2] > C_HI)).sum()
        for impl in IMPLS:
            clipped = torch.zeros((), dtype=torch.int64)
            _run(impl, x, weight, bias, kind, clip, clipped=clipped)
            _run(impl, x[:2], weight, bias, kind, clip, clipped=clipped)
            assert clipped == expected, (kind, impl)


def test_strided_input():
    """A non-contiguous x is normalized as its contiguous copy; dx comes back in x's shape."""
    dense, weight, bias, _ = _inputs((6, 40), torch.float32, "layernorm", True, seed=7)
    x = dense.t().contiguous().t()
    assert not x.is_contiguous()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    for impl in IMPLS:
        out, grads = _run(impl, x, weight, bias, "layernorm", _clip(), g)
        ref_out, ref_grads = _run(impl, dense, weight, bias, "layernorm", _clip(), g)
        assert torch.equal(out, ref_out), impl
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b), impl


def test_empty_input():
    """No rows: an empty x_hat and zero parameter gradients."""
    x, weight, _, _ = _inputs((0, 8), torch.float32, "rmsnorm", False, seed=11)
    for impl in IMPLS:
        out, (dx, dw, _, dclip) = _run(impl, x, weight, None, "rmsnorm", _clip(), torch.empty(0, 8))
        assert out.shape == dx.shape == (0, 8), impl
        assert not dw.any() and not dclip.any(), impl


def test_rejects_bad_input():
    x, weight, bias, _ = _inputs((4, 8), torch.float32, "layernorm", True, seed=9)
    clip = _clip()

    def call(**kw):
        args = dict(x=x, weight=weight, bias=bias, eps=EPS, kind="layernorm", clip=clip, bits=BITS)
        norm_fake_quant(**{**args, **kw})

    with pytest.raises(ValueError, match="kind must be one of"):
        call(kind="batchnorm")
    with pytest.raises(ValueError, match="last\\) dim must be in \\[1, 16384\\]"):
        call(x=torch.zeros(1, 16385))
    with pytest.raises(ValueError, match="rmsnorm takes no bias"):
        call(kind="rmsnorm")
    with pytest.raises(TypeError, match="weight must be a float tensor of shape \\(8,\\)"):
        call(weight=weight[:7])
    with pytest.raises(TypeError, match="weight must be a float tensor"):
        call(weight=torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="bias must be a float tensor"):
        call(bias=bias[None])
    with pytest.raises(ValueError, match="bias is on meta"):
        call(bias=torch.empty(8, device="meta"))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        call(eps=-1.0)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        call(x=x.double())
    with pytest.raises(TypeError, match="clip must be a float"):
        call(clip=clip[:1])
    with pytest.raises(ValueError, match="bits must be an int"):
        call(bits=0)
    with pytest.raises(TypeError, match="clipped"):
        call(clipped=torch.zeros(()))
    with pytest.raises(ValueError, match="impl must be one of"):
        call(impl="cuda")
