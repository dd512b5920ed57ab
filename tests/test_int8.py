"""W8A8 and W4A4 simulations against integer math done by hand in int64, and the act quantizers
(the native-A4 one against training's quantizer, bit for bit; on a GPU's Triton kernel with
``TEST_DEVICE=cuda pytest tests/test_int8.py -k bit_for_bit``, recorded in docs/benchmarks.md)."""
import os

import pytest
import torch

import kernels
from kernels.fake_quant import fake_quant_forward
from quant.activations import fake_quant_per_token, fake_quant_static_clip, quantize_per_token
from quant.convert import act_quantizer
from quant.int8 import int_gemm, quantize_int8, quantize_weight_int8, w8a8_linear
from qat.quantizer import InputQuantizer
from quant.grid import rtn_quantize
from tests.quant_utils import fake_quant64
from tests.test_grid import ref_rtn


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
    """Native-A4 activations are integer codes q in [0, 15] on the kernels' grid, exactly:
    x_hat = q * step + c_lo in fp32 (step = (c_hi - c_lo) / 15), so an integer GEMM of q computes
    what the simulation does."""
    x, W = activations(10, 32, seed=3), torch.randn(8, 32)
    clip = torch.tensor([-2.5, 3.0])
    c_lo, step = clip[0], (clip[1] - clip[0]) / 15
    x_hat = fake_quant_static_clip(x, clip, bits=4)
    q = torch.round((x_hat.double() - c_lo.double()) / step.double())
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q.float() * step + c_lo, x_hat)
    qw = rtn_quantize(W, bits=4)
    w_int = qw.codes.long() - qw.zeros.long()
    # x_hat = q * step + c_lo, so x_hat @ w_hat^T = s_w (step * q @ w_int^T + c_lo * sum_k w_int)
    y_int = qw.scales.double().T * (step.double() * hand_int_product(q, w_int).double()
                                    + c_lo.double() * w_int.sum(1).double())
    x_exact = q * step.double() + c_lo.double()
    torch.testing.assert_close(x_hat.double(), x_exact, rtol=1e-6, atol=1e-6)
    w_exact = w_int.double() * qw.scales.double()
    torch.testing.assert_close(x_exact @ w_exact.T, y_int, rtol=1e-12, atol=1e-12)


# Clips (c_lo, c_hi) as layers learn them: asymmetric (one as of an MLP activation; at (-1.5, 2)
# the quotient round(z) / s and the kernels' product round(z) * ((c_hi - c_lo) / n) differ on 30 %
# of fp32 outputs), symmetric, s = 1 (exact ties), and one held in bf16 as a bf16 engine holds it.
EVAL_CLIPS = [(torch.float32, -1.5, 2.0), (torch.float32, -0.13, 1.71), (torch.float32, -2.0, 2.0),
              (torch.float32, 0.0, 15.0), (torch.bfloat16, -2.3417, 2.6021)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))


def boundary_inputs(clip, bits, dtype, seed, shape=(8, 4, 64)):
    """Activations ([s, b, h] by default) holding every rounding boundary (z = k + 1/2), grid level
    and clip edge of the grid, the neighbours of each in `dtype`, and values well past both clips."""
    c_lo, c_hi = clip.float()
    step = (c_hi - c_lo) / (2 ** bits - 1)
    k = torch.arange(2 ** bits, dtype=torch.float32)
    special = torch.cat([c_lo + (k[:-1] + 0.5) * step, c_lo + k * step, torch.stack([c_lo, c_hi]),
                         c_lo - 3 * step + k[:4], c_hi + 3 * step + k[:4]]).to(dtype)
    inf = torch.full_like(special, float("inf"))
    special = torch.cat([special, torch.nextafter(special, inf), torch.nextafter(special, -inf)])
    x = ((torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * (c_hi - c_lo) / 3)
         + (c_hi + c_lo) / 2).to(dtype)
    shuffle = torch.randperm(special.numel(), generator=torch.Generator().manual_seed(seed))
    x.view(-1)[:special.numel()] = special[shuffle]
    return x


def training_outputs(x, clip, bits):
    """What training's quantizer makes of x: the torch reference, and the Triton kernel (on CPU under
    TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates where GPUs round to nearest as torch
    does: there a bf16 input is run in fp32, which the kernel loads it as, and cast by torch)."""
    triton_in = x.float() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else x
    return {"torch": fake_quant_forward(x, clip, bits, impl="torch"),
            "triton": fake_quant_forward(triton_in, clip, bits, impl="triton").to(x.dtype)}


@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_dtype,c_lo,c_hi", EVAL_CLIPS)
def test_static_clip_is_the_training_quantizer_bit_for_bit(clip_dtype, c_lo, c_hi, dtype, bits):
    """Evaluation's native-A4 quantizer (quant.convert's, from the clip as it loads it) against
    training's on the same input: equal bit for bit, on every rounding boundary and clip edge."""
    clip = torch.tensor([c_lo, c_hi], dtype=clip_dtype, device=DEVICE)
    x = boundary_inputs(clip.cpu(), bits, dtype, seed=bits).to(DEVICE)
    out = act_quantizer(bits, clip.float()).quantize(x)
    assert out.dtype == dtype and out.shape == x.shape
    for impl, want in training_outputs(x, clip, bits).items():
        assert torch.equal(out, want), (impl, (out != want).float().mean().item())
    # The float64 definition, up to the output's rounding; a z within fp32 rounding of a tie may
    # round the other way.
    lo, hi = clip.double()
    z = (x.double().clamp(lo, hi) - lo) * (2 ** bits - 1) / (hi - lo)
    ref = fake_quant64(x, clip, bits)
    off = (out.double() - ref).abs() > torch.finfo(dtype).eps * ref.abs() + 1e-6
    assert ((z - z.floor() - 0.5).abs()[off] < 1e-4).all()


def test_static_clip_rounds_ties_half_to_even():
    clip = torch.tensor([0.0, 15.0])   # s = 1: z = x, exact half-integers
    x = torch.arange(-1.5, 17.0, 0.5)
    assert torch.equal(act_quantizer(4, clip).quantize(x).double(), fake_quant64(x, clip, 4))
    assert torch.equal(act_quantizer(4, clip).quantize(torch.tensor([0.5, 1.5, 2.5])), torch.tensor([0.0, 2.0, 2.0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_learned_clips_quantize_as_in_training(dtype):
    """Per-layer clips as the model learns and holds them (init=mse from a first batch, the (2,)
    parameter in fp32 or a bf16 engine's bf16), on the attention output's strided [s, b, h] view."""
    o = boundary_inputs(torch.tensor([-1.0, 1.3]), 4, dtype, seed=7, shape=(4, 8, 4, 16))  # [b, s, nh, hd]
    view = o.permute(1, 0, 2, 3).flatten(2)
    for param_dtype in (torch.float32, torch.bfloat16):
        q = InputQuantizer(4, "mse", 2.0, splits_input=False)
        q._init_from_batch(o.flatten(2))
        q.to(param_dtype)
        assert q.clip.shape == (2,) and q.clip[0] < q.clip[1]
        out = act_quantizer(q.bits, q.clip.detach().float()).run(lambda t: t, view)
        for impl, want in training_outputs(view, q.clip.detach(), q.bits).items():
            assert torch.equal(out, want), (param_dtype, impl)
        with torch.no_grad():
            assert torch.equal(out, kernels.fake_quant(view, q.clip, q.bits))


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
    with pytest.raises(ValueError, match="NaN"):
        fake_quant_static_clip(torch.tensor([[1.0, float("nan")]]), torch.tensor([-1.0, 1.0]), 4)
    for lo, hi in ((1.0, -1.0), (0.5, 0.5)):
        with pytest.raises(ValueError, match="c_lo < c_hi"):
            fake_quant_static_clip(torch.randn(3, 8), torch.tensor([lo, hi]), 4)
