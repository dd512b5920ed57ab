"""Quantized checkpoint: one safetensors file whose metadata holds a JSON manifest.

Per quantized layer ``name`` the file holds ``layer.<name>.codes`` (packed: two codes per byte,
low nibble first, for bits <= 4 -- so 2- and 3-bit codes also take a nibble each; one code per
uint8 for 5..8 bits), ``.scales`` (float), ``.zeros`` (uint8 zero points), ``.g_idx`` (group of
each stored column), in the stored orientation of quant.grid.QuantizedWeight. Extra float tensors
(e.g. the QAT clip values) go under ``extra.<key>``. The manifest (metadata key
``quant_manifest``) records the method, act-order, bits/group size/sym (null where layers
differ), per layer its shape, bits, group size, sym, AdaDim dim and packing, and under ``info`` any
JSON the writer adds (``quant.quantize`` puts the source checkpoint's config there). Loading reads
only safetensors and JSON (nothing is unpickled) and checks the file against the manifest.
"""
import json
from typing import NamedTuple, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant.grid import DIMS, QuantizedWeight, check_bits

FORMAT, VERSION, MANIFEST_KEY = "quantized-linear-weights", 1, "quant_manifest"


def packing_of(bits: int) -> str:
    return "uint4x2" if bits <= 4 else "uint8"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 storage of integer codes: nibble pairs for bits <= 4 (odd count: zero pad)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if packing_of(bits) == "uint8":
        return flat
    flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of pack_codes; the stored size must be exactly what ``shape`` needs."""
    numel = shape[0] * shape[1]
    nibbles = packing_of(bits) == "uint4x2"
    expected = (numel + 1) // 2 if nibbles else numel
    if packed.dim() != 1 or packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"{packed.numel()} stored bytes do not hold {bits}-bit codes of shape "
                         f"{list(shape)}")
    if nibbles:
        packed = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return packed[:numel].reshape(shape)


def _uniform(layers, attr):
    values = {getattr(q, attr) for q in layers.values()}
    return values.pop() if len(values) == 1 else None


def save_quantized(path: str, layers: dict[str, QuantizedWeight], method: str,
                   act_order: bool = False,
                   extra: Optional[dict[str, torch.Tensor]] = None,
                   info: Optional[dict] = None) -> dict:
    """Write ``layers`` (name -> QuantizedWeight) and ``extra`` fp tensors to ``path``; returns
    the manifest (``info``: JSON-serializable provenance stored with it)."""
    extra = extra or {}
    tensors, entries = {}, {}
    for name, q in layers.items():
        entries[name] = {"shape": list(q.shape), "bits": q.bits, "group_size": q.group_size,
                         "sym": q.sym, "dim": q.dim, "packing": packing_of(q.bits)}
        tensors[f"layer.{name}.codes"] = pack_codes(q.codes, q.bits)
        for field in QuantizedWeight.TENSORS[1:]:
            tensors[f"layer.{name}.{field}"] = getattr(q, field)
    for key, t in extra.items():
        if not t.is_floating_point():
            raise TypeError(f"extra tensor {key!r} must be floating point, got {t.dtype}")
        tensors[f"extra.{key}"] = t
    manifest = {"format": FORMAT, "version": VERSION, "method": method, "act_order": act_order,
                "bits": _uniform(layers, "bits"), "group_size": _uniform(layers, "group_size"),
                "sym": _uniform(layers, "sym"), "layers": entries, "extra": sorted(extra),
                "info": info or {}}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
              metadata={MANIFEST_KEY: json.dumps(manifest)})
    return manifest


class QuantizedCheckpoint(NamedTuple):
    layers: dict[str, QuantizedWeight]
    extra: dict[str, torch.Tensor]
    manifest: dict


def _read_manifest(path, f) -> dict:
    text = (f.metadata() or {}).get(MANIFEST_KEY)
    if text is None:
        raise ValueError(f"{path}: no '{MANIFEST_KEY}' metadata; not a quantized checkpoint")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: manifest is not format {FORMAT!r} version {VERSION}")
    return manifest


def _load_layer(name, entry, get) -> QuantizedWeight:
    """Rebuild one layer, checking every tensor against the manifest entry."""
    try:
        out, inp = entry["shape"]
        bits, group_size, sym, dim = entry["bits"], entry["group_size"], entry["sym"], entry["dim"]
        check_bits(bits)
        if dim not in DIMS or entry["packing"] != packing_of(bits):
            raise ValueError(f"bad dim {dim!r} or packing {entry['packing']!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"layer {name!r}: malformed manifest entry {entry} ({e})") from None
    rows, cols = (out, inp) if dim == "oc" else (inp, out)
    codes = unpack_codes(get(f"layer.{name}.codes"), bits, (rows, cols))
    scales, zeros, g_idx = (get(f"layer.{name}.{f}") for f in QuantizedWeight.TENSORS[1:])
    n_groups = scales.shape[-1] if scales.dim() == 2 else -1
    if scales.shape != (rows, n_groups) or zeros.shape != scales.shape \
            or g_idx.shape != (cols,) or zeros.dtype != torch.uint8:
        raise ValueError(f"layer {name!r}: scales/zeros/g_idx do not fit a [{rows}, {cols}] grid")
    maxq = 2 ** bits - 1
    if codes.max() > maxq or zeros.max() > maxq or g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise ValueError(f"layer {name!r}: codes, zero points or g_idx out of range")
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym, dim)


def load_quantized(path: str, device="cpu") -> QuantizedCheckpoint:
    """Read a checkpoint written by ``save_quantized``; ValueError if it does not match its
    manifest (missing, malformed, missing or unexpected tensors, inconsistent shapes)."""
    with safe_open(path, framework="pt", device=str(device)) as f:
        manifest = _read_manifest(path, f)
        stored = set(f.keys())
        used = set()

        def get(key):
            if key not in stored:
                raise ValueError(f"{path}: tensor {key!r} named by the manifest is missing")
            used.add(key)
            return f.get_tensor(key)

        try:
            layers = {name: _load_layer(name, entry, get)
                      for name, entry in manifest["layers"].items()}
            extra = {key: get(f"extra.{key}") for key in manifest["extra"]}
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: malformed manifest ({e!r})") from None
        if stored - used:
            raise ValueError(f"{path}: tensors not in the manifest: {sorted(stored - used)}")
    return QuantizedCheckpoint(layers, extra, manifest)
