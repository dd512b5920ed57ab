"""AdaDim picks the orientation that loses less and never does worse than both fixed ones."""
import pytest
import torch

from quant.adadim import adadim_quantize, choose_dim, output_error
from quant.gptq import gptq_quantize
from quant.grid import rtn_quantize

N, OUT, IN = 512, 64, 64


def hessian_of(X):
    return 2 / X.shape[0] * X.T @ X


def huge_input_channels_layer(seed):
    """Three input channels carry 50x activations; their weights are correspondingly small."""
    g = torch.Generator().manual_seed(seed)
    act = torch.ones(IN)
    act[[3, 17, 40]] = 50.0
    X = torch.randn(N, IN, generator=g) * act
    return torch.randn(OUT, IN, generator=g) / act, X


def large_rows_layer(seed):
    """Four output rows (one per 16-row group) are 10x larger than the rest; plain inputs."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.ones(OUT)
    row_scale[[3, 17, 40, 60]] = 10.0
    return torch.randn(OUT, IN, generator=g) * row_scale[:, None], torch.randn(N, IN, generator=g)


def fixed_errors(W, H, bits, group_size):
    return {d: output_error(W, rtn_quantize(W, bits, group_size, dim=d).dequantize(), H)
            for d in ("oc", "ic")}


@pytest.mark.parametrize("layer,expected", [(huge_input_channels_layer, "ic"),
                                            (large_rows_layer, "oc")])
@pytest.mark.parametrize("bits,group_size", [(4, -1), (4, 16), (3, 16)])
def test_choice_on_designed_layers(layer, expected, bits, group_size):
    W, X = layer(bits + group_size)
    H = hessian_of(X)
    assert choose_dim(W, H, bits, group_size) == expected
    fixed = fixed_errors(W, H, bits, group_size)
    assert fixed[expected] < 0.9 * max(fixed.values())  # a clear, not a coin-flip, choice

    qw = adadim_quantize(W, H, bits, group_size, method="gptq", act_order=True, static_groups=True)
    assert qw.dim == expected
    gptq_fixed = {d: gptq_quantize(W, H, bits, group_size, act_order=True,
                                   static_groups=d == "oc", dim=d)[1] for d in ("oc", "ic")}
    assert torch.equal(qw.dequantize(), gptq_fixed[expected])
    gptq_errors = [output_error(W, w_hat, H) for w_hat in gptq_fixed.values()]
    assert output_error(W, qw.dequantize(), H) <= min(min(fixed.values()), *gptq_errors)


@pytest.mark.parametrize("seed", range(6))
def test_rtn_error_is_the_better_fixed_choice(seed):
    layer = (huge_input_channels_layer, large_rows_layer)[seed % 2]
    W, X = layer(seed)
    g = torch.Generator().manual_seed(seed)
    W = W * (1 + torch.rand(1, IN, generator=g) * seed)  # blur the designed contrast
    H = hessian_of(X)
    fixed = fixed_errors(W, H, 4, 16)
    qw = adadim_quantize(W, H, 4, 16)
    assert torch.equal(output_error(W, qw.dequantize(), H), min(fixed.values()))


def test_output_error_is_the_activation_error():
    W, X = huge_input_channels_layer(0)
    W, X = W.double(), X.double()
    w_hat = rtn_quantize(W, 4).dequantize().double()
    direct = (X @ W.T - X @ w_hat.T).norm() * (2 / N) ** 0.5
    torch.testing.assert_close(output_error(W, w_hat, hessian_of(X)), direct, rtol=1e-10, atol=0)


def test_bad_method():
    W, X = large_rows_layer(0)
    with pytest.raises(ValueError, match="method"):
        adadim_quantize(W, hessian_of(X), method="awq")
