"""RTN against a float64, element-by-element transcription of the min-max grid."""
import pytest
import torch

from quant.grid import rtn_quantize


def ref_params(values, bits, sym):
    """Scale and zero point of one group (a list of floats), written out literally."""
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    if sym:
        scale = max(-lo, hi) / (2 ** (bits - 1) - 1)
        return (scale if scale > 0 else 1.0), 2 ** (bits - 1)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = scale if scale > 0 else 1.0
    return scale, min(max(round(-lo / scale), 0), 2 ** bits - 1)


def ref_code(value, scale, zero, bits):
    return min(max(round(value / scale) + zero, 0), 2 ** bits - 1)  # round(): half to even


def ref_rtn(w, bits, group_size, sym):
    """Per-row, per-group RTN of a 2-D float64 tensor: (codes, scales, zeros, dequantized)."""
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    codes, deq = torch.zeros_like(w), torch.zeros_like(w)
    scales = torch.zeros(rows, cols // gs, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for r in range(rows):
        for g in range(cols // gs):
            s, z = ref_params(w[r, g * gs:(g + 1) * gs].tolist(), bits, sym)
            scales[r, g], zeros[r, g] = s, z
            for c in range(g * gs, (g + 1) * gs):
                codes[r, c] = ref_code(w[r, c].item(), s, z, bits)
                deq[r, c] = (codes[r, c] - z) * s
    return codes, scales, zeros, deq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size,dim", [(-1, "oc"), (8, "oc"), (4, "ic")])
def test_rtn_matches_float64_transcription(bits, sym, group_size, dim):
    torch.manual_seed(bits)
    w = torch.randn(12, 24) * torch.rand(12, 1) + 0.3 * torch.rand(1, 24)
    qw = rtn_quantize(w, bits, group_size, sym, dim)
    stored = w.double() if dim == "oc" else w.double().T
    codes, scales, zeros, deq = ref_rtn(stored, bits, group_size, sym)
    assert torch.equal(qw.codes.double(), codes)
    assert torch.equal(qw.zeros.double(), zeros)
    torch.testing.assert_close(qw.scales.double(), scales, rtol=1e-6, atol=0)
    expected = deq if dim == "oc" else deq.T
    torch.testing.assert_close(qw.dequantize().double(), expected, rtol=1e-6, atol=1e-7)
    assert qw.shape == tuple(w.shape)


def test_round_half_to_even():
    # 4-bit symmetric, max|w| = 7: scale 1, so w/scale hits the ties exactly.
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0]])
    qw = rtn_quantize(w, bits=4, sym=True)
    signed = qw.codes.long() - qw.zeros.long()[:, qw.g_idx]
    assert signed.tolist() == [[round(v) for v in w[0].tolist()]]


@pytest.mark.parametrize("sym", [False, True])
def test_zero_range_groups_are_safe(sym):
    w = torch.randn(3, 16)
    w[1] = 0.0
    w[2, :8] = 0.0
    qw = rtn_quantize(w, bits=4, group_size=8, sym=sym)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qw.scales).all()
    assert torch.equal(deq[1], torch.zeros(16)) and torch.equal(deq[2, :8], torch.zeros(8))


def test_bad_input_errors():
    w = torch.randn(4, 8)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            rtn_quantize(w, bits)
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(w, 4, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(w, 4, group_size=0)
    with pytest.raises(ValueError, match="dim"):
        rtn_quantize(w, 4, dim="row")
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(w[None], 4)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rtn_quantize(w, 4)
