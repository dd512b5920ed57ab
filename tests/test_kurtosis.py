"""token_kurtosis (Triton under the interpreter on CPU) vs its PyTorch reference vs float64."""
import pytest
import torch

from kernels import KURTOSIS_EPS, token_kurtosis

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
    """Max error relative to the largest gradient (elementwise relative error is ill-posed at 0)."""
    err = (dy.double() - ref64).abs().max() / ref64.abs().max()
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
