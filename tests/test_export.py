"""quant.export: transformers loads the export of a real TP=2 or PP=2 checkpoint (gloo processes)
and computes our logits, for the Llama-style and the GPT-style model; its tokenizer gives
data_prep's ids; lm-eval's ``hf`` model runs a local task on it and scores as our GPTLM does;
GPTQ weights export dequantized with the clips in config.json; what cannot be exported is refused
before anything is written."""
import json
import os

import pytest
import torch

from tests.data_utils import ROOT, tiny_data
from tests.dist_utils import run_distributed
from tests.test_posttrain import save_checkpoint
from tests.test_posttrain_cli import cli

LLAMA = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
# name -> (model overrides, TP, PP); the GPT-style PP=2 model has no biases (exported as zeros).
MODELS = {"llama-tp2": (LLAMA, 2, 1), "llama-pp2": (LLAMA, 1, 2),
          "gpt2-tp2": ({}, 2, 1), "gpt2-pp2": ({"bias": False}, 1, 2)}
ARCH = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
TEXTS = [" leading space", "  two  spaces\n\nnew lines\n\tand a tab ", "unicode: café naïve 日本語 🙂 Ωmega ∑",
         "<s> special </s> <pad> <unk> strings", "digits 1234567 and 3.14", "", " ", "\n", "▁meta-space"]
BATCH = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The trained checkpoints of MODELS (512-piece tokenizer, QAT on) and their exports."""
    from quant.export import main

    tokenizer = os.path.join(tiny_data(tmp_path_factory), "tokenizer.model")
    root = tmp_path_factory.mktemp("export")
    for name, (model, tp, pp) in MODELS.items():
        extra = {"model": {"vocab_size": 512, **model}, "data": {"paths": [], "tokenizer": tokenizer}}
        run_distributed(save_checkpoint, 2, str(root / name), tp, pp, extra)
        main(["--checkpoint", str(root / name), "--output", str(root / f"{name}-hf")])
    return root


def reference(paths, quantized=None, task_limit=0):
    """Our logits [b, s, V] on BATCH per checkpoint, QAT quantizers off (what transformers runs),
    with ``quantized``'s weights when given; and our GPTLM's lambada_openai metrics on the first."""
    from data_prep.tokenizer import load_tokenizer
    from pretrain.parallel_dims import ParallelConfig, init_distributed
    from quant import quantize
    from quant.convert import convert
    from quant.lm_eval_adapter import GPTLM, run_tasks
    from pretrain.reshard import load_checkpoint
    from quant.load import model_from_checkpoint

    init_distributed(ParallelConfig())
    logits, metrics = [], None
    for path in paths:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        convert(model, 4 if quantized else 16, 16, quantize.load(quantized)[0] if quantized else None)
        with torch.no_grad():
            logits.append(model(BATCH).transpose(0, 1))
        if task_limit and metrics is None:
            os.chdir(ROOT)
            lm = GPTLM(model, load_tokenizer(ckpt.config.data.tokenizer), ckpt.config.model.seq_length, 4)
            metrics = run_tasks(lm, ["lambada_openai"], task_limit)["lambada_openai"]
    return logits, metrics


def hf_logits(path, arch):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == arch
    assert not any(info.values()), info          # no missing, unexpected or mismatched weights
    with torch.no_grad():
        return model.eval()(BATCH).logits


@pytest.fixture(scope="module")
def ours(checkpoints):
    """reference() of the MODELS checkpoints (lambada_openai on the first), in one process."""
    return run_distributed(reference, 1, [str(checkpoints / name) for name in MODELS], None, 8)[0]


def test_transformers_logits_equal_ours(checkpoints, ours):
    for name, want in zip(MODELS, ours[0]):
        got = hf_logits(checkpoints / f"{name}-hf", ARCH[name.split("-")[0]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_config_records_the_qat_clips(checkpoints):
    from pretrain.reshard import load_checkpoint

    state = load_checkpoint(str(checkpoints / "llama-tp2")).state
    with open(checkpoints / "llama-tp2-hf" / "config.json") as f:
        w4a4 = json.load(f)["w4a4"]
    clips = w4a4["activations"]["clips"]
    assert w4a4["weights"] is None and w4a4["activations"]["bits"] == 4 and len(clips) == 2 * 7
    qkv, fc1 = (state[f"blocks.1.{s}.input_quant.clip"].tolist() for s in ("attn.qkv", "mlp.fc1"))
    assert [clips[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv"] == [qkv] * 3
    assert clips["model.layers.1.mlp.gate_proj"] == clips["model.layers.1.mlp.up_proj"] == fc1


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_autotokenizer_gives_data_preps_ids(checkpoints, tmp_path, model_type):
    import lzma

    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer
    from data_prep.train_tokenizer import train_tokenizer
    from quant.export import hf_tokenizer

    demo = os.path.join(ROOT, "data", "demo", "valid.jsonl.xz")
    with lzma.open(demo, "rt") as f:
        texts = TEXTS + [json.loads(line)["text"] for line in f]
    if model_type == "bpe":                        # the export's own
        export, sp_model = checkpoints / "gpt2-tp2-hf", str(checkpoints / "gpt2-tp2-hf" / "tokenizer.model")
    else:
        sp_model = train_tokenizer([demo], 512, "unigram", str(tmp_path / "uni"), threads=1)["model"]
        sp_model, export = str(tmp_path / sp_model), tmp_path / "hf"
        hf_tokenizer(sp_model, 16).save_pretrained(export)
    sp, hf = load_tokenizer(sp_model), AutoTokenizer.from_pretrained(export)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (2, 3, 0, 1)
    for text in texts:
        if model_type == "unigram" and "<s>" in text:   # transformers' Unigram matches control pieces (documented)
            continue
        ids = sp.tokenize(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == sp.detokenize(ids), text


def test_lm_eval_hf_model_runs_a_local_task_as_our_adapter(checkpoints, ours, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quant.lm_eval_adapter import TASK_DIR

    monkeypatch.chdir(ROOT)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoints / 'llama-tp2-hf'},dtype=float32", tasks=["lambada_openai"],
        task_manager=TaskManager(include_path=TASK_DIR, include_defaults=False), limit=8, batch_size=4,
        device="cpu", bootstrap_iters=0, log_samples=False)["results"]
    for metric in ("acc", "perplexity"):            # the same log-likelihoods
        assert results["lambada_openai"][f"{metric},none"] == pytest.approx(ours[1][metric], rel=1e-4), metric


def test_gptq_export_has_the_dequantized_weights_and_records_the_settings(checkpoints):
    from quant import quantize
    from quant.export import main

    w4, hf = checkpoints / "llama-pp2-w4", checkpoints / "llama-pp2-w4-hf"
    code, out, err = cli("quant.quantize", "--checkpoint", str(checkpoints / "llama-pp2"), "--output", str(w4),
                         "--nsamples", "4", "--group-size", "16")
    assert code == 0, out + err
    main(["--checkpoint", str(checkpoints / "llama-pp2"), "--quantized", str(w4), "--output", str(hf)])
    layers, clips, _ = quantize.load(str(w4))
    from safetensors.torch import load_file
    tensors = load_file(hf / "model.safetensors")
    for i in range(2):
        for ours, theirs in (("attn.proj", "self_attn.o_proj"), ("mlp.fc2", "mlp.down_proj")):
            assert torch.equal(tensors[f"model.layers.{i}.{theirs}.weight"], layers[f"blocks.{i}.{ours}"].dequantize())
    (want,), _ = run_distributed(reference, 1, [str(checkpoints / "llama-pp2")], str(w4))[0]
    torch.testing.assert_close(hf_logits(hf, "LlamaForCausalLM"), want, rtol=1e-4, atol=1e-5)
    with open(hf / "config.json") as f:
        w4a4 = json.load(f)["w4a4"]
    assert w4a4["weights"]["method"] == "gptq" and w4a4["weights"]["bits"] == 4
    assert w4a4["weights"]["group_size"] == 16 and w4a4["weights"]["quantized"] == str(w4)
    assert w4a4["activations"]["clips"]["model.layers.0.mlp.down_proj"] == clips["blocks.0.mlp.fc2"].tolist()


def test_what_cannot_be_exported_is_refused_before_writing(checkpoints, tmp_path):
    from model.config import GPTConfig
    from quant.export import architecture

    assert architecture(GPTConfig(**LLAMA)) == "LlamaForCausalLM"
    assert architecture(GPTConfig(bias=False)) == "GPT2LMHeadModel"
    prefix = "cannot export to Hugging Face transformers: model.positions="
    for over, rest in (({"norm": "layernorm"}, "norm=rmsnorm; this model has model.norm=layernorm"),
                       ({"mlp": "gelu"}, "mlp=swiglu; this model has model.mlp=gelu"),
                       ({"bias": True}, "bias=false; this model has model.bias=true")):
        with pytest.raises(ValueError) as e:
            architecture(GPTConfig(**{**LLAMA, **over}))
        assert str(e.value) == f"{prefix}rope maps to LlamaForCausalLM, which needs model.{rest}"
    with pytest.raises(ValueError) as e:
        architecture(GPTConfig(mlp="swiglu"))
    assert str(e.value) == f"{prefix}learned maps to GPT2LMHeadModel, which needs model.mlp=gelu; this model has model.mlp=swiglu"

    run = tmp_path / "rope-layernorm"   # a real checkpoint the command refuses: one line, exit 2, nothing written
    run_distributed(save_checkpoint, 1, str(run), 1, 1, {"model": {"positions": "rope", "bias": False}})
    out = tmp_path / "out" / "hf"
    code, stdout, err = cli("quant.export", "--checkpoint", str(run), "--output", str(out))
    assert code == 2 and err.splitlines() == [f"checkpoint error: {prefix}rope maps to LlamaForCausalLM, which "
                                              "needs model.norm=rmsnorm; this model has model.norm=layernorm"], stdout + err
    assert not (tmp_path / "out").exists()

    code, stdout, err = cli("quant.export", "--checkpoint", str(checkpoints / "gpt2-tp2"),
                            "--output", str(checkpoints / "gpt2-tp2-hf"))
    assert code == 2 and err.splitlines()[-1] == (f"python -m quant.export: error: --output {checkpoints / 'gpt2-tp2-hf'} "
                                                  "exists and is not an empty directory; refusing to overwrite it")
    assert not [p for p in os.listdir(checkpoints) if ".partial-" in p]
