"""Hugging Face transformers model directory from a pretrain checkpoint: ``python -m quant.export``.

    python -m quant.export --checkpoint runs/demo --output runs/demo/hf
    python -m quant.export --checkpoint runs/demo --quantized runs/demo/w4-gptq --output runs/demo/hf-w4

The checkpoint (any TP/PP layout) is read by pretrain.reshard.load_checkpoint. Two architectures are exported, each
only when the model computes exactly what the transformers class does:

- positions=rope, norm=rmsnorm, mlp=swiglu, bias=false -> ``LlamaForCausalLM``
- positions=learned, norm=layernorm, mlp=gelu (tanh; ``gelu_new``) -> ``GPT2LMHeadModel`` (biases
  this model lacks are written as zeros; the LM head stays untied)

anything else is refused before anything is written. The directory holds ``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer (``tokenizer.json`` built from
the SentencePiece model so that ``AutoTokenizer`` gives data_prep's ids: no BOS/EOS added, special
tokens in text encoded as text; and the ``tokenizer.model`` itself). With ``--quantized`` (a
quant.quantize output) the block linears hold the dequantized weights. The QAT clips and the weight
quantization settings are recorded under ``w4a4`` in config.json (docs/DESIGN.md); transformers
ignores that key and runs 16-bit activations, which for a QAT model is quant.convert.QUANTIZERS_OFF.
The directory is written under a temporary name beside ``--output`` and renamed into place.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import torch

from pretrain.checkpoint import CheckpointError

log = logging.getLogger("quant")
# The model options each transformers class computes exactly, keyed by model.positions.
ARCHITECTURES = {"rope": ("LlamaForCausalLM", {"norm": "rmsnorm", "mlp": "swiglu", "bias": False}),
                 "learned": ("GPT2LMHeadModel", {"norm": "layernorm", "mlp": "gelu"})}
# Our block linears -> the transformers linears that share their input (and so their QAT clip).
LINEARS = {"LlamaForCausalLM": {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                "attn.proj": ("self_attn.o_proj",), "mlp.fc1": ("mlp.gate_proj", "mlp.up_proj"),
                                "mlp.fc2": ("mlp.down_proj",)},
           "GPT2LMHeadModel": {"attn.qkv": ("attn.c_attn",), "attn.proj": ("attn.c_proj",),
                               "mlp.fc1": ("mlp.c_fc",), "mlp.fc2": ("mlp.c_proj",)}}
BLOCK_PREFIX = {"LlamaForCausalLM": "model.layers.{}.", "GPT2LMHeadModel": "transformer.h.{}."}


def _yaml(value) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def architecture(cfg) -> str:
    """The transformers class of a model config (model.config.GPTConfig); a CheckpointError naming
    the first option that class cannot compute."""
    arch, needs = ARCHITECTURES[cfg.positions]
    for option, want in needs.items():
        have = getattr(cfg, option)
        if have != want:
            raise CheckpointError(f"cannot export to Hugging Face transformers: model.positions={cfg.positions} "
                                  f"maps to {arch}, which needs model.{option}={_yaml(want)}; this model has "
                                  f"model.{option}={_yaml(have)}")
    return arch


def _pieces(sub: str, t: torch.Tensor, cfg) -> list[torch.Tensor]:
    """Our fused rows as the transformers linears' rows: qkv's [head, (q, k, v), head_dim] rows
    as q, k, v (each head-major); SwiGLU fc1's interleaved (gate, up) rows as gate, up."""
    if sub == "attn.qkv":
        return [x.flatten(0, 1) for x in t.unflatten(0, (cfg.num_heads, 3, cfg.head_dim)).unbind(1)]
    if sub == "mlp.fc1" and cfg.mlp == "swiglu":
        return [t[0::2], t[1::2]]
    return [t]


def hf_state(arch: str, cfg, state: dict) -> dict[str, torch.Tensor]:
    """The transformers state dict of our full (TP=1) state. GPT-2's Conv1D weights are [in, out]."""
    out = {}
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", BLOCK_PREFIX[arch].format(i)
        for sub, names in LINEARS[arch].items():
            weight, bias = state[f"{ours}{sub}.linear.weight"], state.get(f"{ours}{sub}.linear.bias")
            if arch == "LlamaForCausalLM":
                out.update({f"{theirs}{n}.weight": w for n, w in zip(names, _pieces(sub, weight, cfg))})
                continue
            weight = torch.cat(_pieces(sub, weight, cfg))
            out[f"{theirs}{names[0]}.weight"] = weight.t()
            out[f"{theirs}{names[0]}.bias"] = (torch.cat(_pieces(sub, bias, cfg)) if bias is not None
                                               else weight.new_zeros(weight.shape[0]))
        norms = ({"norm1": "input_layernorm", "norm2": "post_attention_layernorm"} if arch == "LlamaForCausalLM"
                 else {"norm1": "ln_1", "norm2": "ln_2"})
        for mine, name in norms.items():
            out.update(_norm(arch, state, f"{ours}{mine}", f"{theirs}{name}"))
    out["lm_head.weight"] = state["head.output.linear.weight"]
    if arch == "LlamaForCausalLM":
        out["model.embed_tokens.weight"] = state["embedding.tokens.weight"]
        out.update(_norm(arch, state, "head.norm", "model.norm"))
    else:
        out["transformer.wte.weight"] = state["embedding.tokens.weight"]
        out["transformer.wpe.weight"] = state["embedding.positions.weight"]
        out.update(_norm(arch, state, "head.norm", "transformer.ln_f"))
    return {k: v.contiguous().clone() for k, v in out.items()}   # safetensors: dense, unshared


def _norm(arch: str, state: dict, ours: str, theirs: str) -> dict:
    weight = state[f"{ours}.weight"]
    if arch == "LlamaForCausalLM":
        return {f"{theirs}.weight": weight}
    return {f"{theirs}.weight": weight, f"{theirs}.bias": state.get(f"{ours}.bias", weight.new_zeros(weight.shape))}


def hf_config(arch: str, cfg, dtype: torch.dtype):
    """The transformers config of our model config: the same shapes, eps, rope base, no dropout
    beyond ours (GPT-2's resid_pdrop is ours: on attention and MLP outputs), untied LM head."""
    from transformers import GPT2Config, LlamaConfig

    from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID
    from model.layers import ROPE_BASE

    common = dict(architectures=[arch], vocab_size=cfg.vocab_size, tie_word_embeddings=False,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  dtype=str(dtype).removeprefix("torch."))
    if arch == "LlamaForCausalLM":
        return LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=cfg.num_heads, head_dim=cfg.head_dim, hidden_act="silu",
                           max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
                           rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
                           attention_bias=False, mlp_bias=False, attention_dropout=0.0, **common)
    return GPT2Config(n_positions=cfg.seq_length, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                      n_head=cfg.num_heads, n_inner=cfg.ffn_size, activation_function="gelu_new",
                      resid_pdrop=cfg.dropout, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                      reorder_and_upcast_attn=False, **common)


def hf_tokenizer(path: str, max_length: int):
    """A transformers fast tokenizer that encodes as data_prep's SentencePiece model: transformers'
    own SentencePiece conversion (normalizer spec, dummy prefix, byte fallback, BPE merges by score),
    no BOS/EOS added, and special-token strings in text encoded as text (with a BPE model, the
    project's; transformers' Unigram model matches control pieces such as ``<s>`` in text, which
    SentencePiece encodes as characters)."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type == 1:   # unigram: pieces with scores; BPE: merges come from the scores
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    spec = proto.trainer_spec
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos_piece, eos_token=spec.eos_piece,
                                   unk_token=spec.unk_piece, pad_token=spec.pad_piece, split_special_tokens=True,
                                   model_max_length=max_length, clean_up_tokenization_spaces=False)


def tokenizer_file(ckpt, path: str | None) -> str:
    """The SentencePiece model the checkpoint was trained with (its data.tokenizer unless given),
    checked against the recorded hash; a CheckpointError otherwise."""
    from data_prep.tokenizer import file_sha256

    path = path or ckpt.config.data.tokenizer
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"{ckpt.path}: its tokenizer {path!r} is not there; give it with --tokenizer")
    want = ckpt.meta.get("tokenizer_sha256")
    if want is not None and file_sha256(path) != want:
        raise CheckpointError(f"tokenizer {path} is not the one {ckpt.path} was trained with (sha256 {want})")
    return path


def w4a4_record(arch: str, ckpt, clips: dict, manifest: dict | None, quantized: str | None) -> dict:
    """config.json's ``w4a4``: the QAT clips of every transformers linear (by module name) and how
    the weights were quantized, for users who run the model at W4A4."""
    from quant.convert import QUANTIZERS_OFF

    hf_clips = {}
    for name, clip in clips.items():
        if name == "head.output":
            hf_clips["lm_head"] = clip.tolist()
            continue
        block, sub = name.removeprefix("blocks.").split(".", 1)
        for module in LINEARS[arch][sub]:
            hf_clips[BLOCK_PREFIX[arch].format(block) + module] = clip.tolist()
    acts = None
    if hf_clips:
        bits = ckpt.config.qat.bits
        acts = {"bits": bits, "scheme": "static asymmetric per tensor, learned clips [c_lo, c_hi] of each "
                "linear's input: x_hat = round((clamp(x, c_lo, c_hi) - c_lo) * n / (c_hi - c_lo)) * "
                f"(c_hi - c_lo) / n + c_lo, n = {2 ** bits - 1}, round half to even",
                "clips": hf_clips, "as_exported": f"16-bit activations: {QUANTIZERS_OFF}"}
    weights = None
    if manifest is not None:
        weights = {**manifest["info"]["spec"], "quantized": quantized, "linears": "block linears; embeddings "
                   "and LM head 16-bit", "stored": "dequantized"}
    return {"activations": acts, "weights": weights, "checkpoint": ckpt.path, "iteration": ckpt.meta.get("iteration")}


def write(output: str, model_files) -> None:
    """Call ``model_files(dir)`` on a temporary directory beside ``output`` and rename it to
    ``output`` (which may be an empty directory): a failure leaves no half-written model."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.partial-", dir=parent)
    try:
        model_files(partial)
        os.chmod(partial, 0o755)   # mkdtemp's 0700 is not what a model directory should be
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quant.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir (newest complete)")
    p.add_argument("--quantized", help="output dir of python -m quant.quantize: export its dequantized weights")
    p.add_argument("--output", required=True, help="new (or empty) directory for the transformers model")
    p.add_argument("--tokenizer", help="the SentencePiece .model (default: the checkpoint's data.tokenizer; "
                   "checked against its recorded hash)")
    args = p.parse_args(argv)
    if os.path.lexists(args.output) and not (os.path.isdir(args.output) and not os.listdir(args.output)):
        p.error(f"--output {args.output} exists and is not an empty directory; refusing to overwrite it")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from quant import quantize
    from quant.evaluate import check_source
    from pretrain.reshard import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)      # everything is checked before anything is written
    cfg = ckpt.config.model
    arch = architecture(cfg)
    sp_model = tokenizer_file(ckpt, args.tokenizer)
    state = dict(ckpt.state)
    clips = {k.removesuffix(".input_quant.clip"): t for k, t in state.items() if k.endswith(".input_quant.clip")}
    manifest = None
    if args.quantized:
        layers, clips, manifest = quantize.load(args.quantized)
        check_source(manifest, ckpt, args.quantized)
        for name, q in layers.items():
            key = f"{name}.linear.weight"
            state[key] = q.dequantize(state[key].dtype)
    tensors = hf_state(arch, cfg, state)
    config = hf_config(arch, cfg, state["embedding.tokens.weight"].dtype)
    record = w4a4_record(arch, ckpt, clips, manifest, args.quantized) if clips or manifest else None

    def model_files(out: str) -> None:
        config.save_pretrained(out)
        if record is not None:
            path = os.path.join(out, "config.json")
            with open(path) as f:
                saved = json.load(f)
            with open(path, "w") as f:
                json.dump({**saved, "w4a4": record}, f, indent=2)
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(out)
        hf_tokenizer(sp_model, cfg.seq_length).save_pretrained(out)
        shutil.copyfile(sp_model, os.path.join(out, "tokenizer.model"))

    write(args.output, model_files)
    log.info(f"wrote {args.output}: {arch}, {cfg.num_layers} blocks, hidden {cfg.hidden_size}"
             + (f", weights of {args.quantized}" if args.quantized else ""))
    if record and record["activations"]:
        log.info(f"QAT model: transformers runs it with {record['activations']['as_exported']}; "
                 "its clips are under w4a4 in config.json")


if __name__ == "__main__":
    from quant.load import run_cli
    sys.exit(run_cli(main))
