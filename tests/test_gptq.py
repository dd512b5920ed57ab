"""Blocked GPTQ against a float64 column-by-column transcription, and against RTN."""
import logging

import pytest
import torch

from quant.gptq import gptq_quantize
from quant.grid import rtn_quantize
from tests.test_grid import ref_code, ref_params


def gptq_reference(weight, hessian, bits, group_size=-1, sym=False, act_order=False,
                   static_groups=False, dim="oc", percdamp=0.01):
    """GPTQ written out literally in float64: one column at a time, no blocks, no Cholesky.

    After each column the remaining inverse Hessian is updated by Gaussian elimination (the
    optimal-brain-surgeon form), which the Cholesky rows of the real code stand for.
    Returns (codes in the stored orientation, scales by stored row, g_idx, W_hat).
    """
    W, H = weight.double().clone(), hessian.double().clone()
    rows, cols = W.shape
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j], W[:, j] = 1.0, 0.0
    per_ic = dim == "ic"
    gs = (rows if per_ic else cols) if group_size == -1 else group_size
    natural = W.clone()
    perm = sorted(range(cols), key=lambda j: -H[j, j].item()) if act_order else list(range(cols))
    W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * sum(H[j, j].item() for j in range(cols)) / cols
    Hinv = torch.linalg.inv(H + damp * torch.eye(cols, dtype=torch.float64))

    codes, W_hat = torch.zeros_like(W), torch.zeros_like(W)
    grids = {}  # (stored row, group) -> (scale, zero)
    g_idx = [0] * cols
    for j in range(cols):
        for r in range(rows):
            if per_ic:
                g = r // gs
                if r % gs == 0:
                    grids[perm[j], g] = ref_params(W[r:r + gs, j].tolist(), bits, sym)
                s, z = grids[perm[j], g]
            else:
                g = (perm[j] if (static_groups or group_size == -1) else j) // gs
                g_idx[perm[j]] = g
                if (r, g) not in grids:
                    source = natural[r, g * gs:(g + 1) * gs] if static_groups or group_size == -1 \
                        else W[r, j:j + gs]
                    grids[r, g] = ref_params(source.tolist(), bits, sym)
                s, z = grids[r, g]
            codes[r, j] = ref_code(W[r, j].item(), s, z, bits)
            W_hat[r, j] = (codes[r, j] - z) * s
        err = (W[:, j] - W_hat[:, j]) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]

    inv = [perm.index(j) for j in range(cols)]
    codes, W_hat = codes[:, inv], W_hat[:, inv]
    stored_rows = cols if per_ic else rows
    scales = torch.tensor([[grids[r, g][0] for g in range((rows if per_ic else cols) // gs)]
                           for r in range(stored_rows)], dtype=torch.float64)
    if per_ic:
        return codes.T, scales, torch.arange(rows) // gs, W_hat
    return codes, scales, torch.tensor(g_idx), W_hat


def correlated_layer(out, inp, tokens, seed, dead=()):
    """A weight and the Hessian 2/N X^T X of inputs with correlated, unevenly scaled channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    X = torch.randn(tokens, inp, generator=g) @ mix * (0.2 + 2 * torch.rand(inp, generator=g))
    X[:, list(dead)] = 0
    W = torch.randn(out, inp, generator=g) * (0.5 + torch.rand(out, 1, generator=g))
    H = 2 / tokens * X.T @ X
    return W, X, (H + H.T) / 2  # exactly symmetric: Cholesky reads one triangle, inv() both


CASES = [  # (group_size, static_groups, act_order, dim, block_size, sym)
    (-1, False, False, "oc", 16, False),
    (-1, False, True, "oc", 16, True),
    (8, False, False, "oc", 16, False),
    (8, False, True, "oc", 16, False),
    (8, False, True, "oc", 12, True),   # block size rounded to the group size
    (8, True, False, "oc", 12, False),  # static groups: blocks need not align with groups
    (8, True, True, "oc", 16, False),
    (-1, False, True, "ic", 16, False),
    (4, False, True, "ic", 12, True),
]


@pytest.mark.parametrize("group_size,static,act_order,dim,block_size,sym", CASES)
def test_blocked_matches_float64_transcription(group_size, static, act_order, dim, block_size,
                                               sym):
    W, _, H = correlated_layer(16, 40, 200, seed=7, dead=(5, 33))
    kw = dict(bits=3, group_size=group_size, sym=sym, act_order=act_order, static_groups=static,
              dim=dim)
    codes, scales, g_idx, W_ref = gptq_reference(W, H, **kw)

    qw64, W_hat64 = gptq_quantize(W.double(), H.double(), block_size=block_size, **kw)
    assert torch.equal(qw64.codes.double(), codes)
    assert torch.equal(qw64.g_idx, g_idx)
    torch.testing.assert_close(qw64.scales, scales, rtol=1e-9, atol=0)
    torch.testing.assert_close(W_hat64, W_ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(W_hat64[:, [5, 33]], torch.zeros(16, 2, dtype=torch.float64))

    qw32, W_hat32 = gptq_quantize(W, H, block_size=block_size, **kw)  # the fp32 production path
    assert W_hat32.dtype == torch.float32 and torch.equal(W_hat32, qw32.dequantize())
    assert (qw32.codes.double() == codes).float().mean() > 0.98
    assert (W_hat32.double() - W_ref).norm() < 0.05 * (W.double() - W_ref).norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("group_size,static,act_order,dim,block_size,sym", CASES)
def test_cuda_graph_solve_equals_eager_bit_for_bit(group_size, static, act_order, dim, block_size, sym):
    kw = dict(bits=4, group_size=group_size, sym=sym, act_order=act_order, static_groups=static,
              dim=dim, block_size=block_size)
    for seed in range(2):  # the second layer replays the graphs the first one captured
        W, _, H = correlated_layer(16, 40, 200, seed=seed, dead=(5, 33))
        got, want = (gptq_quantize(W.cuda(), H.cuda(), cuda_graph=g, **kw) for g in (True, False))
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(got[0], field), getattr(want[0], field)), field
        assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, -1), (4, 32)])
def test_gptq_output_error_below_rtn(bits, group_size):
    W, X, H = correlated_layer(48, 128, 1024, seed=bits + group_size)
    ref = X @ W.T
    err = {}
    for name, w_hat in (
        ("rtn", rtn_quantize(W, bits, group_size).dequantize()),
        ("gptq", gptq_quantize(W, H, bits, group_size)[1]),
        ("gptq_act", gptq_quantize(W, H, bits, group_size, act_order=True)[1]),
        ("gptq_static", gptq_quantize(W, H, bits, group_size, act_order=True,
                                      static_groups=True)[1]),
    ):
        err[name] = (ref - X @ w_hat.T).norm().item()
    for name in ("gptq", "gptq_act", "gptq_static"):
        assert err[name] < 0.8 * err["rtn"], err


def test_singular_hessian_retries_dampening(caplog):
    W = torch.randn(8, 16)
    H = torch.full((16, 16), 2.0)  # rank one: Cholesky meets an exact zero pivot
    with caplog.at_level(logging.WARNING, logger="quant.gptq"):
        qw, W_hat = gptq_quantize(W, H, bits=4, percdamp=0.0)
    assert "retrying" in caplog.text
    assert torch.isfinite(W_hat).all() and torch.isfinite(qw.scales).all()

    off = 3 * torch.diag(torch.ones(15), 1)
    indefinite = torch.eye(16) + off + off.T
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quant.gptq"):
        _, W_hat = gptq_quantize(W, indefinite, bits=4)
    assert caplog.text.count("retrying") >= 2 and torch.isfinite(W_hat).all()


def test_all_dead_columns():
    W = torch.randn(4, 8)
    qw, W_hat = gptq_quantize(W, torch.zeros(8, 8), bits=4, group_size=4)
    assert torch.equal(W_hat, torch.zeros(4, 8)) and torch.isfinite(qw.scales).all()


def test_bad_input_errors():
    W, _, H = correlated_layer(4, 8, 32, seed=0)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(W, H[:4, :4])
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(W, H, static_groups=True, dim="ic")
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize(W, -H)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(W, H, percdamp=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, block_size=0)
    H[0, 1] = float("inf")
    with pytest.raises(ValueError, match="hessian contains NaN"):
        gptq_quantize(W, H)
