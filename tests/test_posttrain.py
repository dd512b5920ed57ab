"""Post-training on real gloo processes: TP=2 checkpoint consolidation, distributed GPTQ == one
rank, perplexity and the W8A8 / W4A4 conversions against hand computations."""
import math
import os

import pytest
import torch

from tests.dist_utils import run_distributed

TINY = {"model": {"vocab_size": 96, "seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 2},
        "parallel": {"zero_stage": 1}, "qat": {"enabled": True}}


def save_checkpoint(out_dir: str, tp: int, pp: int = 1, extra: dict | None = None):
    """Train two DeepSpeed steps under TP=tp x PP=pp (config sections updated by ``extra``), save
    through pretrain.checkpoint; return this rank's full-width (TP-gathered) parameters under the
    plain GPT's names."""
    from model.sharding import gather_state_dict
    from pretrain import checkpoint
    from pretrain.engine import build_engine
    from pretrain.trainer import Trainer
    from tests.train_utils import build, global_samples, gpt_names, merged, rank_micro_batches

    over = {**TINY, "parallel": {"zero_stage": 1, "tensor": tp, "pipeline": pp},
            "train": {**TINY["train"], "out_dir": out_dir}}
    cfg, dims, model, quantizers, penalties = build(merged(over, extra or {}))
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    batches = rank_micro_batches(global_samples(cfg, 2 * cfg.train.global_batch_size), cfg.train.micro_batch_size)
    for _ in range(2):
        trainer.train_step(batches)
    checkpoint.save(trainer.engine, trainer, cfg, model)
    return gpt_names(model, gather_state_dict(model))


def test_consolidated_tp2_checkpoint_equals_full_model(tmp_path):
    from pretrain.reshard import load_checkpoint

    full = run_distributed(save_checkpoint, 2, str(tmp_path), 2)[0]
    ckpt = load_checkpoint(str(tmp_path))                  # run dir -> newest complete step
    assert ckpt.meta["tensor_parallel"] == 2 and ckpt.config.model.hidden_size == 32
    assert set(ckpt.state) >= set(full)
    for name, tensor in full.items():
        assert torch.equal(ckpt.state[name], tensor), name
    assert ckpt.state["blocks.0.attn.qkv.input_quant.clip"].shape == (2,)
    # ... and loads strictly (every key, every shape) into a TP=1 model that runs.
    assert run_distributed(logits_of_checkpoint, 1, ckpt.path)[0].shape == (16, 1, 96)

    os.remove(os.path.join(ckpt.path, "COMPLETE"))
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint(ckpt.path)


def test_consolidated_pp2_checkpoint_equals_full_model(tmp_path):
    from pretrain.reshard import load_checkpoint

    stages = run_distributed(save_checkpoint, 2, str(tmp_path), 1, 2)
    full = {**stages[0], **stages[1]}
    assert not set(stages[0]) & set(stages[1])             # each stage owns its layers
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt.meta["pipeline_parallel"] == 2 and set(ckpt.state) >= set(full)
    for name, tensor in full.items():
        assert torch.equal(ckpt.state[name], tensor), name
    assert run_distributed(logits_of_checkpoint, 1, ckpt.path)[0].shape == (16, 1, 96)


def logits_of_checkpoint(path):
    from pretrain.parallel_dims import ParallelConfig, init_distributed
    from pretrain.reshard import load_checkpoint
    from quant.load import model_from_checkpoint

    init_distributed(ParallelConfig())
    model = model_from_checkpoint(load_checkpoint(path))
    return model(torch.arange(16)[None] % 96)


def tiny_model(qat: bool, model_over: dict | None = None):
    from model.gpt import build_gpt
    from pretrain.config import config_from_dict
    from pretrain.parallel_dims import ParallelConfig, init_distributed
    from qat.quantizer import attach_qat

    init_distributed(ParallelConfig())
    cfg = config_from_dict({**TINY, "model": {**TINY["model"], **(model_over or {})}, "qat": {"enabled": qat}})
    torch.manual_seed(0)
    model = build_gpt(cfg.model)
    attach_qat(model, cfg.qat)
    return cfg, model.eval()


def gptq_on_ranks(method):
    from quant.quantize import QuantSpec, quantize_model

    _, model = tiny_model(qat=True)
    windows = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    results, times = quantize_model(model, windows, QuantSpec(method, 4, group_size=8, act_order=True), batch_size=2)
    assert times["hessian"] > 0 and times["solve"] > 0
    fields = {name: {f: getattr(q, f) for f in ("codes", "scales", "zeros", "g_idx")} for name, q in results.items()}
    return fields, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["gptq", "adadim-gptq"])   # AdaDim's per-IC codes are a transposed view
def test_distributed_gptq_equals_one_rank_bit_for_bit(method):
    (one,) = run_distributed(gptq_on_ranks, 1, method)
    assert len(one[0]) == 8                               # 2 blocks x (qkv, proj, fc1, fc2)
    for world in (2, 3):                                  # 4 batches: 2 + 2 and 1 + 1 + 2
        for fields, state in run_distributed(gptq_on_ranks, world, method):
            assert fields.keys() == one[0].keys() and state.keys() == one[1].keys()
            for name, want in one[0].items():
                for field, t in want.items():
                    assert torch.equal(fields[name][field], t), (world, name, field)
            for name, t in one[1].items():                # the dequantized model
                assert torch.equal(state[name], t), (world, name)


def gptq_reused_and_recomputed(model_over):
    """Per method, (fields, dequantized model, completed calls of each linear) of quantize_model
    with and without reusing the block's earlier passes."""
    from model.gpt import linears
    from quant.quantize import QuantSpec, quantize_model

    windows = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    runs = {}
    for method in ("gptq", "adadim-gptq"):
        for reuse in (True, False):
            _, model = tiny_model(qat=True, model_over=model_over)
            calls = dict.fromkeys((n for n, _ in linears(model)), 0)
            for n, linear in linears(model):
                linear.register_forward_hook(lambda m, a, y, n=n: calls.__setitem__(n, calls[n] + 1))
            results, _ = quantize_model(model, windows, QuantSpec(method, 4, group_size=8, act_order=True),
                                        batch_size=2, reuse=reuse)
            fields = {name: {f: getattr(q, f) for f in ("codes", "scales", "zeros", "g_idx")}
                      for name, q in results.items()}
            runs[method, reuse] = fields, dict(model.named_parameters()), calls
    return runs


@pytest.mark.parametrize("model_over", [{}, {"mlp": "swiglu", "positions": "rope", "norm": "rmsnorm", "bias": False}])
def test_reusing_earlier_passes_equals_recomputing_bit_for_bit(model_over):
    runs = run_distributed(gptq_reused_and_recomputed, 1, model_over)[0]
    for method in ("gptq", "adadim-gptq"):
        (fields, state, calls), (ref_fields, ref_state, ref_calls) = runs[method, True], runs[method, False]
        for name, want in ref_fields.items():
            for field, t in want.items():
                assert torch.equal(fields[name][field], t), (method, name, field)
        for name, t in ref_state.items():
            assert torch.equal(state[name], t), (method, name)
        blocks = {n: c for n, c in calls.items() if n.startswith("blocks.")}
        assert set(blocks.values()) == {4}                # each block linear once per batch (4 batches);
        assert ref_calls["blocks.0.attn.qkv"] == 4 * 4    # recomputing runs qkv in 3 later passes + the outputs


def evaluation_checks():
    """Perplexity and the converted layers vs hand computations, on one process."""
    from quant.convert import convert
    from quant.evaluate import perplexity
    from quant.grid import rtn_quantize
    from tests.quant_utils import fake_quant64

    _, model = tiny_model(qat=False)
    windows = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(windows).transpose(0, 1).double()  # [b, s, V]
    window_nll = []
    for w, lg in zip(windows, logits):
        lp = lg[:-1] - lg[:-1].exp().sum(-1, keepdim=True).log()
        window_nll.append(-sum(lp[t, w[t + 1]].item() for t in range(15)) / 15)
    hand_ppl = math.exp(sum(window_nll) / len(window_nll))
    got_ppl = perplexity(model, windows, batch_size=2)

    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(3)) * 2
    layer = model.blocks[0].attn.qkv
    w, b = layer.weight.detach().clone().double(), layer.linear.bias.detach().clone().double()
    xt = x.reshape(-1, 32).double()

    # W8A8: symmetric int8 per token x per output channel, exact integer sum.
    convert(model, 8, 8)
    y8 = layer(x).reshape(-1, 96).double()
    sx, sw = xt.abs().amax(1, keepdim=True) / 127, w.abs().amax(1, keepdim=True) / 127
    qx, qw = torch.round(xt / sx).long(), torch.round(w / sw).long()
    hand8 = (qx @ qw.T).double() * sx * sw.T + b

    # W4A4 (no QAT): asymmetric 4-bit per token and per output channel, centred integer codes.
    _, model = tiny_model(qat=False)
    layer = model.blocks[0].attn.qkv
    q4 = {"blocks.0.attn.qkv": rtn_quantize(layer.weight.detach(), 4)}
    convert(model, 4, 4, q4)
    y4 = layer(x).reshape(-1, 96).double()

    def asym(t):
        lo, hi = t.amin(1, keepdim=True).clamp(max=0), t.amax(1, keepdim=True).clamp(min=0)
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        return (torch.clamp(torch.round(t / s) + z, 0, 15) - z).long(), s

    cx, sx = asym(xt)
    cw, sw = asym(w)
    hand4 = (cx @ cw.T).double() * sx * sw.T + b

    # W4A4 (QAT): the learned static clip on the input.
    cfg, model = tiny_model(qat=True)
    layer = model.blocks[0].attn.qkv
    layer.input_quant.clip.data = torch.tensor([-1.5, 2.0])
    convert(model, 4, 4, q4)
    yc = layer(x).reshape(-1, 96).double()
    x_hat = fake_quant64(xt, torch.tensor([-1.5, 2.0]), 4)
    handc = x_hat @ (cw.double() * sw).T + b

    # W8A8 (QAT): the same learned clip range on the 8-bit grid, int8 vector-wise weights.
    cfg, model = tiny_model(qat=True)
    layer = model.blocks[0].attn.qkv
    layer.input_quant.clip.data = torch.tensor([-1.5, 2.0])
    w = layer.weight.detach().clone().double()
    convert(model, 8, 8)
    y8c = layer(x).reshape(-1, 96).double()
    x_hat8 = fake_quant64(xt, torch.tensor([-1.5, 2.0]), 8)
    sw8 = w.abs().amax(1, keepdim=True) / 127
    hand8c = x_hat8 @ (torch.round(w / sw8) * sw8).T + b
    return got_ppl, hand_ppl, (y8, hand8), (y4, hand4), (yc, handc), (y8c, hand8c)


def analysis_of_qat_model():
    """quant.analyze on a QAT model: the inputs it measures are those of the model as trained
    (W16A4 through quant.convert), seen before quantization."""
    from quant.analyze import analyze
    from quant.convert import block_linears, convert
    from qat.quantizer import InputQuantizer

    windows = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(5))
    _, model = tiny_model(qat=True)
    for m in model.modules():
        if isinstance(m, InputQuantizer):
            m.clip.data = torch.tensor([-0.3, 0.4])            # coarse enough to change later layers
    _, ref = tiny_model(qat=True)
    ref.load_state_dict(model.state_dict())
    got = analyze(model, windows, qat_bits=4, batch_size=2)["linears"]
    convert(ref, 16, 4)
    seen = {}
    for name, linear in block_linears(ref):
        linear.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(0, 4, 2):
            ref(windows[i:i + 2])
    want = {n: torch.cat(xs).std(dim=1, unbiased=False).mean().item() for n, xs in seen.items()}
    return {n: s["token_std"] for n, s in got.items()}, want


def test_analysis_runs_a_qat_model_as_trained():
    got, want = run_distributed(analysis_of_qat_model, 1)[0]
    assert got.keys() == want.keys()
    for name in got:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name


def linear_inputs_as_trained_and_evaluated():
    """Every block linear's quantized input in one forward of a QAT model (clips set by init=mse
    from that batch) as trained, and after quant.convert to W16A4."""
    from quant.convert import block_linears, convert

    windows = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(6))
    _, model = tiny_model(qat=True)
    with torch.no_grad():
        model(windows)
    _, evaluated = tiny_model(qat=True)
    evaluated.load_state_dict(model.state_dict())
    convert(evaluated, 16, 4)
    seen = []
    for m in (model, evaluated):
        inputs = {}
        for name, linear in block_linears(m):
            linear.linear.register_forward_pre_hook(lambda _, args, n=name, d=inputs: d.setdefault(n, args[0]))
        with torch.no_grad():
            m(windows)
        seen.append(inputs)
    return seen


def test_w16a4_evaluation_quantizes_every_linear_input_as_training():
    """Bit for bit in fp32. (Not in bf16: training's norm and activation kernels quantize their
    fp32 result, evaluation the producer's output rounded to bf16.)"""
    trained, evaluated = run_distributed(linear_inputs_as_trained_and_evaluated, 1)[0]
    assert len(trained) == 8 and trained.keys() == evaluated.keys()
    for name, x_hat in trained.items():
        assert torch.equal(evaluated[name], x_hat), name


def test_perplexity_and_converted_layers_match_hand_computation():
    got_ppl, hand_ppl, *pairs = run_distributed(evaluation_checks, 1)[0]
    assert got_ppl == pytest.approx(hand_ppl, rel=1e-5)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def activation_descriptions():
    """What quant.convert says it did to the activations, per (QAT, WxAy)."""
    from quant.convert import convert

    return {(qat, w, a): convert(tiny_model(qat)[1], w, a)["acts"]
            for qat in (True, False) for w, a in ((16, 16), (4, 16), (4, 4))}


def test_a_qat_models_a16_configurations_are_marked_quantizers_off():
    acts = run_distributed(activation_descriptions, 1)[0]
    off = "quantizers off, not a deployment configuration"
    assert acts == {(True, 16, 16): off, (True, 4, 16): off, (True, 4, 4): "qat clip",
                    (False, 16, 16): "16-bit", (False, 4, 16): "16-bit", (False, 4, 4): "per-token asym 4-bit"}
    from quant.evaluate import format_table
    table = {"W16A16": {"wikitext2_ppl": {"value": 10.0, "change_pct": 0.0}},
             "W4A4": {"wikitext2_ppl": {"value": 11.0, "change_pct": 10.0}}}
    assert format_table(table, ["W16A16"]).splitlines() == [
        "config    wikitext2_ppl", "W16A16 †  10", "W4A4      11 (+10.0%)",
        f"† {off}: a QAT model runs with its learned clips (W16A4 is the model as trained)"]
    assert format_table(table).splitlines() == ["config  wikitext2_ppl", "W16A16  10", "W4A4    11 (+10.0%)"]


def test_calibration_text_is_read_as_data_prep_reads_training_text(tmp_path):
    """One document reader: text blocks split at blank lines, .xz read, a malformed line refused
    with its location (post-training allows none), evaluation files not refused."""
    import lzma

    from data_prep.documents import MalformedInputError
    from quant.corpora import C4, read_documents

    text = tmp_path / "calib.txt.xz"
    with lzma.open(text, "wt", encoding="utf-8") as f:
        f.write("first line\nstill first\n\n\nsecond\n")
    assert read_documents(str(text)) == ["first line\nstill first", "second"]
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text key"}\n')
    with pytest.raises(MalformedInputError, match=r"calib.jsonl:2 has no string under key 'text'"):
        read_documents(str(bad))
    assert len(read_documents(C4)) == 1000
