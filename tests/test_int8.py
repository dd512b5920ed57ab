"""W8A8 and W4A4 simulations against integer math done by hand in int64, and the act quantizers."""
import pytest
import torch

from kernels.fake_quant import fake_quant_forward
from quant.actquant import (fake_quant_per_token, fake_quant_static_clip, quantize_per_token,
                            quantize_static_clip)
from quant.int8 import int_gemm, quantize_int8, quantize_weight_int8, w8a8_linear
from quant.rtn import rtn_quantize
from tests.test_rtn import ref_rtn


def hand_int_product(a, b):
    """sum_k a[m, k] * b[n, k] as an explicit broadcasted int64 sum (no matmul)."""
    return (a.long()[:, None, :] * b.long()[None, :, :]).sum(-1)


def activations(tokens, features, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g) * torch.rand(tokens, 1, generator=g) * 4
    x[:, 5] *= 20  # an outlier channel
    x[1] = 0       # an all-zero token
    return x


@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (40, 24, 16), (17, 33, 9)])
def test_int_gemm_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    out = int_gemm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), hand_int_product(a, b))


def test_int8_codes_match_float64_transcription():
    x = activations(6, 32, seed=0)
    q, scale = quantize_int8(x)
    codes, scales, zeros, _ = ref_rtn(x.double(), bits=8, group_size=-1, sym=True)
    assert q.dtype == torch.int8 and torch.equal(q.long(), (codes - zeros).long())
    torch.testing.assert_close(scale.double(), scales, rtol=1e-6, atol=0)
    assert torch.equal(q[1], torch.zeros(32, dtype=torch.int8)) and q.abs().max() == 127


def test_w8a8_equals_hand_integer_math():
    x = activations(20, 40, seed=1).reshape(4, 5, 40)
    W = torch.randn(24, 40) * torch.linspace(0.1, 2, 24)[:, None]
    bias = torch.randn(24)
    w_q, w_scale = quantize_weight_int8(W)
    x_q, x_scale = quantize_int8(x.reshape(-1, 40))
    expected = hand_int_product(x_q, w_q).float() * x_scale * w_scale + bias
    y = w8a8_linear(x, w_q, w_scale, bias)
    assert y.shape == (4, 5, 24) and torch.equal(y.reshape(-1, 24), expected)
    ref = x.reshape(-1, 40).double() @ W.double().T + bias.double()
    assert (y.reshape(-1, 24).double() - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize("group_size", [-1, 16])
def test_w4a4_simulation_equals_integer_math(group_size):
    x, W = activations(12, 48, seed=2), torch.randn(20, 48)
    xq = quantize_per_token(x, bits=4)
    qw = rtn_quantize(W, bits=4, group_size=group_size)
    x_int = (xq.codes - xq.zero).to(torch.int8)                   # centred codes in [-15, 15]
    w_int = (qw.codes.long() - qw.zeros.long()[:, qw.g_idx]).to(torch.int8)
    gs = 48 if group_size == -1 else group_size
    y_int = torch.zeros(12, 20, dtype=torch.float64)
    for g in range(48 // gs):
        cols = slice(g * gs, (g + 1) * gs)
        prod = hand_int_product(x_int[:, cols], w_int[:, cols])
        assert torch.equal(int_gemm(x_int[:, cols], w_int[:, cols]).long(), prod)
        y_int += prod.double() * xq.scale.double() * qw.scales[:, g].double()
    # fp32 dequantization is the exact value (q - z) * s, correctly rounded once ...
    x_exact = x_int.double() * xq.scale.double()
    w_exact = w_int.double() * qw.scales.double()[:, qw.g_idx]
    assert torch.equal(xq.dequantize(), x_exact.float())
    assert torch.equal(qw.dequantize(), w_exact.float())
    # ... and the simulated matmul on those values is the integer GEMM rescaled per group
    torch.testing.assert_close(x_exact @ w_exact.T, y_int, rtol=1e-12, atol=1e-12)
    y_sim32 = fake_quant_per_token(x, 4) @ qw.dequantize().T  # what evaluation runs
    torch.testing.assert_close(y_sim32.double(), y_int, rtol=1e-5, atol=1e-5)


def test_native_a4_simulation_equals_integer_math():
    x, W = activations(10, 32, seed=3), torch.randn(8, 32)
    c_lo, c_hi = torch.tensor(-2.5), torch.tensor(3.0)
    cq = quantize_static_clip(x, c_lo, c_hi, bits=4)
    qw = rtn_quantize(W, bits=4)
    w_int = qw.codes.long() - qw.zeros.long()
    # x_hat = q / s + c_lo, so x_hat @ w_hat^T = s_w (q @ w_int^T / s + c_lo * sum_k w_int)
    y_int = qw.scales.double().T * (hand_int_product(cq.codes, w_int).double() / cq.s.double()
                                    + c_lo.double() * w_int.sum(1).double())
    x_exact = cq.codes.double() / cq.s.double() + c_lo.double()
    torch.testing.assert_close(cq.dequantize().double(), x_exact, rtol=1e-6, atol=1e-6)
    w_exact = w_int.double() * qw.scales.double()
    torch.testing.assert_close(x_exact @ w_exact.T, y_int, rtol=1e-12, atol=1e-12)
    assert cq.codes.min() >= 0 and cq.codes.max() <= 15


def test_static_clip_is_the_qat_forward():
    x = activations(16, 64, seed=4).bfloat16()
    c_lo, c_hi = torch.tensor(-1.75), torch.tensor(2.25)
    for bits in (4, 8):
        assert torch.equal(fake_quant_static_clip(x, c_lo, c_hi, bits),
                           fake_quant_forward(x, torch.stack([c_lo, c_hi]), bits, impl="torch"))
    with pytest.raises(ValueError, match="c_lo < c_hi"):
        fake_quant_static_clip(x, c_hi, c_lo, 4)


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True), (3, False)])
def test_per_token_matches_float64_transcription(bits, sym):
    x = activations(8, 24, seed=bits)
    codes, _, _, deq = ref_rtn(x.double(), bits, -1, sym)
    q = quantize_per_token(x, bits, sym)
    assert torch.equal(q.codes.double(), codes)
    torch.testing.assert_close(fake_quant_per_token(x, bits, sym).double(), deq,
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(fake_quant_per_token(x, bits, sym)[1], torch.zeros(24))


def test_bad_inputs():
    with pytest.raises(TypeError):
        int_gemm(torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="inner"):
        int_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(2, 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="features"):
        w8a8_linear(torch.randn(3, 7), *quantize_weight_int8(torch.randn(4, 8)))
    with pytest.raises(ValueError, match="NaN"):
        quantize_per_token(torch.tensor([[1.0, float("inf")]]), 4)
