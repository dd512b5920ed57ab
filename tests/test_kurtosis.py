"""token_kurtosis and the regularizer's entry points (Triton under the interpreter on CPU) vs the
PyTorch reference vs float64; KurtosisPenalty's gradient and logging."""
import pytest
import torch

from kernels import KURTOSIS_EPS, token_kurtosis
from kernels.kurtosis import token_kurtosis_grad, token_kurtosis_stats

IMPLS = ["torch", "triton"]


def _tagged(impl):
    """assert_close message prefix naming the implementation that failed."""
    return lambda msg: f"{impl}: {msg}"


def _ulp(dtype):
    return torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# token_kurtosis: float64 reference
# ---------------------------------------------------------------------------------------------

def kurtosis64(y, eps=KURTOSIS_EPS):
    """The definition, in float64 and differentiable by autograd."""
    d = y - y.mean(-1, keepdim=True)
    m2, m4 = (d ** 2).mean(-1), (d ** 4).mean(-1)
    return m4 / (m2 ** 2 + eps)


def _activations(shape, dtype, seed, mean):
    """Per-row shifted Gaussians with a few outlier channels, as a linear layer's output."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 3
    y[..., :: max(1, shape[-1] // 5)] *= 8.0
    return (y + mean * torch.randn(shape[:-1] + (1,), generator=gen)).to(dtype)


def _assert_grad_close(dy, ref64, rtol):
    """Max error relative to the largest gradient (elementwise relative error is ill-posed at 0);
    an all-zero reference must be matched exactly."""
    err = (dy.double() - ref64).abs().max() / ref64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    assert err <= rtol, f"gradient max rel error {err:.3g} > {rtol:.3g}"


# Large means only in fp32: bf16/fp16 cannot even hold a std-1 signal at mean 1e3.
KURTOSIS_CASES = [(torch.float32, 1e3), (torch.float16, 4.0), (torch.bfloat16, 4.0)]


@pytest.mark.parametrize("dtype,mean", KURTOSIS_CASES)
@pytest.mark.parametrize("shape", [(37, 129), (3, 5, 200), (2, 8200)])
def test_kurtosis_forward_backward_match_float64(shape, dtype, mean):
    y = _activations(shape, dtype, seed=6, mean=mean)
    g = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(7))
    y64 = y.double().requires_grad_()
    kappa64 = kurtosis64(y64)
    kappa64.backward(g.double())
    results = {}
    for impl in IMPLS:
        yr = y.clone().requires_grad_()
        kappa = token_kurtosis(yr, impl=impl)
        kappa.backward(g)
        assert kappa.dtype == torch.float32 and kappa.shape == shape[:-1]
        assert yr.grad.dtype == dtype and yr.grad.shape == shape
        torch.testing.assert_close(kappa.double(), kappa64.detach(), rtol=1e-5, atol=0,
                                   msg=_tagged(impl))
        _assert_grad_close(yr.grad, y64.grad, rtol=2 * _ulp(dtype) + 1e-5)
        results[impl] = (kappa, yr.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=0)
    _assert_grad_close(results["triton"][1], results["torch"][1].double(), 2 * _ulp(dtype) + 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kurtosis_gradient_against_float64_finite_differences(impl):
    """gradcheck in spirit: the analytic backward vs central differences of the float64 loss."""
    y = _activations((3, 11), torch.float32, seed=8, mean=2.0)
    g = torch.randn(3, generator=torch.Generator().manual_seed(9))
    yr = y.clone().requires_grad_()
    token_kurtosis(yr, impl=impl).backward(g)
    h, y64, fd = 1e-6, y.double(), torch.zeros_like(y, dtype=torch.float64)
    for idx in range(y.numel()):
        step = torch.zeros(y.numel(), dtype=torch.float64)
        step[idx] = h
        step = step.view_as(y64)
        diff = kurtosis64(y64 + step) - kurtosis64(y64 - step)
        fd.view(-1)[idx] = (diff @ g.double()) / (2 * h)
    _assert_grad_close(yr.grad, fd, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kurtosis_constant_rows_are_finite_and_zero(impl):
    y = _activations((6, 130), torch.float32, seed=10, mean=1.0)
    for row, value in zip((0, 2, 3, 5), (0.0, 1.0, -3.7, 0.1)):
        y[row] = value
    yr = y.clone().requires_grad_()
    kappa = token_kurtosis(yr, impl=impl)
    kappa.sum().backward()
    assert torch.isfinite(kappa).all() and torch.isfinite(yr.grad).all()
    assert (kappa[[0, 2, 3, 5]].abs() < 1e-4).all(), kappa
    torch.testing.assert_close(kappa[[1, 4]].double(), kurtosis64(y[[1, 4]].double()), rtol=1e-5,
                               atol=0)


def test_kurtosis_bitwise_repeatable():
    y = _activations((9, 300), torch.bfloat16, seed=11, mean=4.0)
    g = torch.randn(9, generator=torch.Generator().manual_seed(12))
    runs = []
    for _ in range(2):
        yr = y.clone().requires_grad_()
        kappa = token_kurtosis(yr, impl="triton")
        kappa.backward(g)
        runs.append((kappa, yr.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_kurtosis_rejects_bad_input():
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        token_kurtosis(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        token_kurtosis(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty last"):
        token_kurtosis(torch.randn(4, 0))
    with pytest.raises(ValueError, match="eps must be > 0"):
        token_kurtosis(torch.randn(4, 8), eps=0.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_kurtosis(torch.randn(4, 8), impl="numpy")


# ---------------------------------------------------------------------------------------------
# token_kurtosis_stats / token_kurtosis_grad: the regularizer's no-autograd entry points
# ---------------------------------------------------------------------------------------------

def _grad_out(shape, dtype, layout, seed):
    """An incoming gradient of y's shape: contiguous, rows padded (row stride > width: no copy
    needed), or every other column (column stride 2: copied)."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    wide = torch.randn(shape[:-1] + (2 * n,), generator=gen).to(dtype)
    return wide[..., :n] if layout == "padded_rows" else wide[..., ::2]


def _grad64(y, g_kappa, grad_out):
    """d(sum_t g_kappa_t kappa_t)/dy + grad_out from float64 autograd of the definition."""
    y64 = y.double().requires_grad_()
    g64 = g_kappa.double() if isinstance(g_kappa, torch.Tensor) else g_kappa
    (kurtosis64(y64) * g64).sum().backward()
    return y64.grad + (0 if grad_out is None else grad_out.double())


@pytest.mark.parametrize("dtype,mean", KURTOSIS_CASES)
@pytest.mark.parametrize("shape", [(37, 129), (3, 5, 200), (2, 8200), (4, 1)])
@pytest.mark.parametrize("g_kind", ["float", "per_token"])
@pytest.mark.parametrize("layout", [None, "contiguous", "padded_rows", "strided_cols"])
def test_kurtosis_grad_plus_grad_out_matches_float64(shape, dtype, mean, g_kind, layout):
    y = _activations(shape, dtype, seed=13, mean=mean)
    # dL/dkappa scaled so the kurtosis term peaks at 4, as large as grad_out: both are tested
    g_kappa = 4.0 / max(_grad64(y, 1.0, None).abs().max().item(), 1e-6)
    if g_kind == "per_token":
        g_kappa = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(14)) * g_kappa
    grad_out = None if layout is None else _grad_out(shape, dtype, layout, seed=15)
    ref = _grad64(y, g_kappa, grad_out)
    if grad_out is not None and shape[-1] > 1:
        assert (ref - grad_out.double()).abs().max() > 0.1 * ref.abs().max()
    results = {}
    for impl in IMPLS:
        kappa, stats = token_kurtosis_stats(y, impl=impl)
        assert kappa.dtype == torch.float32 and kappa.shape == shape[:-1] and not kappa.requires_grad
        torch.testing.assert_close(kappa.double(), kurtosis64(y.double()), rtol=1e-5, atol=1e-6,
                                   msg=_tagged(impl))
        dy = token_kurtosis_grad(y, stats, g_kappa, grad_out=grad_out, impl=impl)
        assert dy.dtype == dtype and dy.shape == shape and torch.isfinite(dy).all()
        _assert_grad_close(dy, ref, rtol=2 * _ulp(dtype) + 1e-5)
        # without stats: the kernel forms them from the row itself
        alone = token_kurtosis_grad(y, None, g_kappa, grad_out=grad_out, impl=impl)
        _assert_grad_close(alone, ref, rtol=2 * _ulp(dtype) + 1e-5)
        if impl == "torch":   # the same function of y forms the stats: the same bits
            assert torch.equal(alone, dy)
        results[impl] = dy
    _assert_grad_close(results["triton"], results["torch"].double(), 2 * _ulp(dtype) + 1e-5)


def test_kurtosis_grad_float_equals_constant_per_token_tensor():
    y = _activations((9, 300), torch.bfloat16, seed=16, mean=4.0)
    grad_out = _grad_out((9, 300), torch.bfloat16, "contiguous", seed=17)
    for impl in IMPLS:
        _, stats = token_kurtosis_stats(y, impl=impl)
        a = token_kurtosis_grad(y, stats, 0.37, grad_out=grad_out, impl=impl)
        b = token_kurtosis_grad(y, stats, torch.full((9,), 0.37), grad_out=grad_out, impl=impl)
        assert torch.equal(a, b), impl


def test_kurtosis_grad_bitwise_repeatable():
    y = _activations((9, 300), torch.bfloat16, seed=18, mean=4.0)
    grad_out = _grad_out((9, 300), torch.bfloat16, "strided_cols", seed=19)
    runs = []
    for _ in range(2):
        kappa, stats = token_kurtosis_stats(y, impl="triton")
        runs.append((kappa, token_kurtosis_grad(y, stats, 2.5, grad_out=grad_out, impl="triton")))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_kurtosis_grad_rejects_bad_input():
    y = torch.randn(4, 8)
    _, stats = token_kurtosis_stats(y)
    with pytest.raises(ValueError, match="stats must be fp32 of shape"):
        token_kurtosis_grad(y, stats[:3], 1.0)
    with pytest.raises(ValueError, match="g_kappa must be a float or of shape"):
        token_kurtosis_grad(y, stats, torch.ones(8))
    with pytest.raises(ValueError, match="grad_out must have y's shape"):
        token_kurtosis_grad(y, stats, 1.0, grad_out=torch.ones(4, 9))


# ---------------------------------------------------------------------------------------------
# KurtosisPenalty: one autograd node per site
# ---------------------------------------------------------------------------------------------

def _penalty(reduce, lambda_=0.3):
    from qat.kurtosis import KurtosisConfig, KurtosisPenalty

    return KurtosisPenalty(KurtosisConfig(enabled=True, lambda_=lambda_, reduce=reduce),
                           split_channels=False, split_tokens=False)


def test_config_eps_is_the_kernels_default():
    """qat.config loads without torch, so it states the value instead of importing it."""
    from qat.config import KurtosisConfig

    assert KurtosisConfig().eps == KURTOSIS_EPS


@pytest.mark.parametrize("dtype,mean", KURTOSIS_CASES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("record", [False, True], ids=["stats-in-backward", "stats-in-forward"])
def test_penalty_adds_its_gradient_to_the_incoming_one(reduce, dtype, mean, record, monkeypatch):
    """y's gradient is g + lambda * grad_scale * d(reduce_t kappa_t)/dy, with the grad scale set
    before the forward (read there, where a compiled graph guards on it; a later change does not
    reach this backward); on log steps too."""
    from qat import kurtosis

    monkeypatch.setattr(kurtosis, "_grad_scale", 1.0)   # restored after the test
    shape, lambda_, scale = (3, 5, 200), 0.3, 0.25
    y = _activations(shape, dtype, seed=20, mean=mean)
    g = _grad_out(shape, dtype, "contiguous", seed=21) * 0.03   # as large as the penalty's part
    penalty = _penalty(reduce, lambda_)
    penalty.record_stats = record
    yr = y.clone().requires_grad_()
    kurtosis.set_grad_scale(scale)
    out = penalty(yr)
    assert torch.equal(out, yr) and out.data_ptr() == yr.data_ptr()
    kurtosis.set_grad_scale(2 * scale)
    out.backward(g)
    ref = _grad64(y, lambda_ * scale / (15 if reduce == "mean" else 1), g)
    _assert_grad_close(yr.grad, ref, rtol=2 * _ulp(dtype) + 1e-5)
    assert min((ref - g.double()).abs().max(), g.abs().max()) > 0.05 * ref.abs().max()  # both tested
    assert penalty.tokens == 15


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_penalty_records_kurtosis_only_when_asked(reduce):
    y = _activations((3, 5, 200), torch.float32, seed=22, mean=2.0).requires_grad_()
    penalty = _penalty(reduce)
    penalty(y).sum().backward()
    assert penalty.kurtosis_sum is None and penalty.last_mean() is None
    penalty.record_stats = True
    penalty(y).sum().backward()
    mean64 = kurtosis64(y.detach().double()).mean()
    torch.testing.assert_close(penalty.last_mean().double(), mean64, rtol=1e-5, atol=0)
    expected = 0.3 * (mean64 * 15 if reduce == "sum" else mean64)
    torch.testing.assert_close(penalty.penalty(penalty.last_mean()).double(), expected, rtol=1e-5,
                               atol=0)
    penalty.record_stats = False
    penalty(y)
    assert penalty.last_mean() is None


@pytest.mark.parametrize("record", [False, True])
def test_penalty_saves_only_y(record):
    """Nothing besides y is kept for backward, also on log steps (the backward kernel forms the
    stats, so logging cannot change the gradient); without grad it does nothing."""
    y = torch.randn(6, 7, 64, requires_grad=True)
    saved = []
    penalty = _penalty("mean")
    penalty.record_stats = record
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        penalty(y)
    assert {t.untyped_storage().data_ptr() for t in saved if t.numel() == y.numel()} == \
        {y.untyped_storage().data_ptr()}
    assert all(t.numel() == y.numel() for t in saved)
    with torch.no_grad():
        assert _penalty("mean")(y) is y
