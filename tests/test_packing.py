"""Quantized checkpoint: bit-exact round trip, and clear errors for a missing/tampered manifest."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant.gptq import gptq_quantize
from quant.packing import MANIFEST_KEY, load_quantized, pack_codes, save_quantized, unpack_codes
from quant.grid import rtn_quantize


def layers():
    g = torch.Generator().manual_seed(0)
    W = lambda out, inp: torch.randn(out, inp, generator=g)  # noqa: E731
    x = torch.randn(64, 16, generator=g)
    return {
        "blocks.0.attn.qkv": rtn_quantize(W(24, 16), bits=4, group_size=8),
        "blocks.0.attn.out": rtn_quantize(W(16, 16), bits=3, group_size=4, sym=True, dim="ic"),
        "blocks.0.mlp.fc1": rtn_quantize(W(32, 16), bits=8),
        "blocks.0.mlp.fc2": gptq_quantize(W(12, 16), 2 / 64 * x.T @ x, bits=4, group_size=4,
                                          act_order=True)[0],  # g_idx not in natural order
        "odd": rtn_quantize(W(3, 5), bits=2),  # 15 codes: an odd nibble count
    }


def test_round_trip_is_bit_exact(tmp_path):
    path = str(tmp_path / "q.safetensors")
    original = layers()
    extra = {"blocks.0.attn.qkv.c_lo": torch.tensor(-3.5),
             "blocks.0.attn.qkv.c_hi": torch.tensor(4.0), "norm_gains": torch.randn(16).bfloat16()}
    save_quantized(path, original, method="gptq", act_order=True, extra=extra)
    ckpt = load_quantized(path)
    assert list(ckpt.layers) == list(original)
    for name, q in original.items():
        got = ckpt.layers[name]
        for field in ("codes", "scales", "zeros", "g_idx"):
            a, b = getattr(got, field), getattr(q, field)
            assert a.dtype == b.dtype and torch.equal(a, b), (name, field)
        assert (got.bits, got.group_size, got.sym, got.dim) == (q.bits, q.group_size, q.sym, q.dim)
        assert torch.equal(got.dequantize(), q.dequantize())
        entry = ckpt.manifest["layers"][name]
        assert entry["shape"] == list(q.shape) and entry["dim"] == q.dim
    for key, t in extra.items():
        assert ckpt.extra[key].dtype == t.dtype and torch.equal(ckpt.extra[key], t)
    m = ckpt.manifest
    assert (m["method"], m["act_order"], m["bits"], m["group_size"]) == ("gptq", True, None, None)


def test_uniform_settings_in_manifest(tmp_path):
    path = str(tmp_path / "u.safetensors")
    save_quantized(path, {"a": rtn_quantize(torch.randn(8, 16), 4, 8)}, method="rtn")
    m = load_quantized(path).manifest
    assert (m["bits"], m["group_size"], m["sym"], m["extra"]) == (4, 8, False, [])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_codes_sizes_and_inverse(bits):
    codes = torch.randint(0, 2 ** bits, (7, 9), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (32 if bits <= 4 else 63)
    assert torch.equal(unpack_codes(packed, bits, (7, 9)), codes)


def rewrite(path, edit):
    """Re-save ``path`` with edit(tensors, manifest_text) -> (tensors, metadata)."""
    with safe_open(path, framework="pt") as f:
        text = f.metadata()[MANIFEST_KEY]
    tensors, metadata = edit(load_file(path), text)
    save_file(tensors, path, metadata=metadata)


def edit_manifest(change):
    def edit(tensors, text):
        manifest = json.loads(text)
        change(manifest)
        return tensors, {MANIFEST_KEY: json.dumps(manifest)}
    return edit


def set_shape(m):
    m["layers"]["blocks.0.mlp.fc1"]["shape"] = [32, 8]


def transpose_shape(m):  # same number of codes, wrong grid
    m["layers"]["blocks.0.mlp.fc1"]["shape"] = [16, 32]


def set_bits(m):
    m["layers"]["odd"]["bits"] = 9


TAMPERING = [
    (lambda t, text: (t, None), "no 'quant_manifest'"),
    (lambda t, text: (t, {MANIFEST_KEY: text[:-5]}), "not valid JSON"),
    (edit_manifest(lambda m: m.update(version=99)), "version"),
    (edit_manifest(set_shape), "do not hold 8-bit codes of shape"),
    (edit_manifest(transpose_shape), "do not fit a \\[16, 32\\] grid"),
    (edit_manifest(set_bits), "malformed manifest entry"),
    (edit_manifest(lambda m: m["layers"].pop("odd")), "not in the manifest"),
    (edit_manifest(lambda m: m["extra"].append("c_hi")), "'extra.c_hi' named by the manifest"),
    (edit_manifest(lambda m: m.pop("layers")), "malformed manifest"),
    (lambda t, text: ({k: v for k, v in t.items() if "zeros" not in k}, {MANIFEST_KEY: text}),
     "missing"),
]


@pytest.mark.parametrize("edit,message", TAMPERING)
def test_tampered_or_missing_manifest_is_a_clear_error(tmp_path, edit, message):
    path = str(tmp_path / "t.safetensors")
    save_quantized(path, layers(), method="rtn", extra={"c_lo": torch.tensor(-1.0)})
    rewrite(path, edit)
    with pytest.raises(ValueError, match=message):
        load_quantized(path)


def test_extra_must_be_float(tmp_path):
    with pytest.raises(TypeError, match="floating"):
        save_quantized(str(tmp_path / "x.safetensors"), {}, method="rtn",
                       extra={"step": torch.tensor(3)})
