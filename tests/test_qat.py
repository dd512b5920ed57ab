"""QAT and kurtosis regularization in the model: exact gradients, no extra saved activations,
tensor-parallel equivalence (clip values included), and their effect in a short training run."""
import pytest
import torch

import kernels
from model.gpt import linears
from tests.dist_utils import run_distributed
from tests.train_utils import build, global_samples, initial_state, rank_micro_batches, run

QAT = {"qat": {"enabled": True, "bits": 4, "init_value": 2.0}}
QAT_KURT = {**QAT, "kurtosis": {"enabled": True, "lambda": 0.05, "sites": "all", "reduce": "mean"}}


def _ste(v, clip, bits):
    """The straight-through surrogate of DESIGN.md in plain autograd: clamp, plus the rounding
    residual held constant. An input on a clip counts as clipped (its gradient goes to the clip),
    as in DESIGN.md; first-batch inits put the batch's extreme exactly there."""
    lo, hi = clip.float().unbind()
    s = (2 ** bits - 1) / (hi - lo)
    v = v.float()
    vc = torch.where(v <= lo, lo, torch.where(v >= hi, hi, v))
    z = (vc - lo) * s
    return (vc + (torch.round(z) - z).detach() / s).to(v.dtype)


def _unfused(monkeypatch):
    """Route every quantizer through _ste over the model's own unfused norm / activation."""
    from model.layers import activation, norm

    def patched(pre):
        return lambda *args, clipped=None: _ste(pre(*args[:-2]), args[-2], args[-1])

    monkeypatch.setattr(kernels, "norm_fake_quant", patched(norm))
    monkeypatch.setattr(kernels, "act_fake_quant", patched(activation))
    monkeypatch.setattr(kernels, "fake_quant", patched(lambda x: x))


def _qat_grads(overrides, unfused):
    """Loss and every gradient of one QAT forward/backward, fused or through plain autograd."""
    if unfused:
        _unfused(pytest.MonkeyPatch())
    cfg, _, model, quantizers, _ = build(overrides)
    batch = next(rank_micro_batches(global_samples(cfg, cfg.train.micro_batch_size), cfg.train.micro_batch_size))
    loss = model(batch["tokens"], batch["labels"])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_fused_quantizers_match_plain_autograd(mlp):
    """Every linear input (the LM head's too) quantized exactly once, by its producer's kernel or
    in place, with the gradients of the straight-through surrogate: same loss and gradients as
    autograd over unfused ops."""
    over = {**QAT, "qat": {**QAT["qat"], "layers": ["qkv", "proj", "fc1", "fc2", "output"]},
            "model": {"mlp": mlp, "norm": "layernorm" if mlp == "gelu" else "rmsnorm"}}
    loss, grads = run_distributed(_qat_grads, 1, over, False)[0]
    ref_loss, ref = run_distributed(_qat_grads, 1, over, True)[0]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    clips = [n for n in ref if n.endswith("input_quant.clip")]
    assert len(clips) == 9 and all(ref[n].abs().sum() > 0 for n in clips)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _saved_activation_bytes(overrides):
    """Bytes of distinct storages autograd keeps for backward in one forward pass."""
    cfg, _, model, _, _ = build(overrides)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    batch = next(rank_micro_batches(global_samples(cfg, cfg.train.micro_batch_size), cfg.train.micro_batch_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["tokens"], batch["labels"])
    return sum(seen.values())


def test_qat_keeps_no_second_copy_of_linear_inputs():
    base, qat = run_distributed(_saved_activation_bytes, 1, {})[0], run_distributed(_saved_activation_bytes, 1, QAT)[0]
    assert qat <= base * 1.001, (base, qat)


RECOMPUTE = {**QAT, "qat": {**QAT["qat"], "recompute_inputs": True}}


def test_recomputed_inputs_are_not_kept():
    """With qat.recompute_inputs the quantized outputs of the norms before qkv and fc1 and of the MLP
    activation are not kept: exactly (2 x hidden + ffn) x tokens values per block less."""
    from tests.train_utils import TINY, config_from_dict, merged

    cfg = config_from_dict(merged(TINY, QAT))
    qat, recompute = (run_distributed(_saved_activation_bytes, 1, o)[0] for o in (QAT, RECOMPUTE))
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    per_block = (2 * cfg.model.hidden_size + cfg.model.ffn_size) * tokens * torch.float32.itemsize
    assert qat - recompute == cfg.model.num_layers * per_block, (qat, recompute)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_recomputed_inputs_give_the_same_loss_and_gradients_bit_for_bit(mlp):
    layers = {"layers": ["qkv", "proj", "fc1", "fc2", "output"]}
    over = {"model": {"mlp": mlp, "norm": "layernorm" if mlp == "gelu" else "rmsnorm"}}
    kept = run_distributed(_qat_grads, 1, {**over, "qat": {**QAT["qat"], **layers}}, False)[0]
    rebuilt = run_distributed(_qat_grads, 1, {**over, "qat": {**RECOMPUTE["qat"], **layers}}, False)[0]
    assert kept[0] == rebuilt[0]
    assert kept[1].keys() == rebuilt[1].keys()
    for name, g in kept[1].items():
        assert torch.equal(rebuilt[1][name], g), name


def _inputs_pinned_after_forward(mode, overrides=QAT):
    """How many QAT linear inputs the autograd graph keeps for recomputing x_hat after a forward
    with activation checkpointing ``mode`` (each recipe pins one input's storage); and whether the
    clip gradients still arrive."""
    import gc

    from pretrain.parallelize import checkpoint_activations
    from qat.quantizer import _Recompute

    cfg, _, model, quantizers, _ = build(overrides)
    checkpoint_activations(model, mode)
    batch = next(rank_micro_batches(global_samples(cfg, cfg.train.micro_batch_size), cfg.train.micro_batch_size))
    loss = model(batch["tokens"], batch["labels"])
    pinned = sum(isinstance(o, _Recompute) for o in gc.get_objects())
    loss.backward()
    return pinned, all(q.clip.grad is not None for q in quantizers)


def test_checkpointing_leaves_quantized_inputs_to_the_checkpoint():
    """Only proj's input is quantized outside its producer and recomputed in backward; under full
    checkpointing the checkpoint recomputes it instead."""
    assert run_distributed(_inputs_pinned_after_forward, 1, "none")[0] == (2, True)   # 2 blocks
    assert run_distributed(_inputs_pinned_after_forward, 1, "full")[0] == (0, True)
    assert run_distributed(_inputs_pinned_after_forward, 1, "selective")[0] == (2, True)  # attention is not checkpointed
    # with qat.recompute_inputs, qkv's, fc1's and fc2's inputs too, unless a checkpoint recomputes them
    assert run_distributed(_inputs_pinned_after_forward, 1, "none", RECOMPUTE)[0] == (8, True)
    assert run_distributed(_inputs_pinned_after_forward, 1, "full", RECOMPUTE)[0] == (0, True)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_with_qat_and_kurtosis_matches_single_process(sp):
    base = {"model": {"dropout": 0.0}, **QAT_KURT}
    full = run_distributed(initial_state, 1, base)[0]
    ref = run_distributed(run, 1, base, full, 3)[0]
    outs = run_distributed(run, 2, {**base, "parallel": {"tensor": 2, "sequence_parallel": sp}}, full, 3)
    clip_names = [n for n in ref["grads"] if n.endswith("input_quant.clip")]
    assert len(clip_names) == 8 and all(ref["grads"][n].abs().sum() > 0 for n in clip_names)
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=1e-4)
        for name, g in ref["grads"].items():
            torch.testing.assert_close(out["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


SAMPLES = 16   # the first-batch init tests draw their batches from the same samples


def _first_batch_clips(overrides) -> dict:
    """Every quantizer's clips after one forward of this rank's first micro-batch."""
    cfg, _, model, _, _ = build(overrides)
    batch = next(rank_micro_batches(global_samples(cfg, SAMPLES), cfg.train.micro_batch_size))
    model(batch["tokens"], batch["labels"])
    return {n: m.input_quant.clip.detach().clone() for n, m in linears(model) if m.input_quant is not None}


def _clips_after_steps(overrides, steps=2):
    from pretrain.engine import build_engine
    from pretrain.trainer import Trainer

    cfg, dims, model, quantizers, penalties = build(overrides)
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    batches = rank_micro_batches(global_samples(cfg, SAMPLES), cfg.train.micro_batch_size)
    for _ in range(steps):
        trainer.train_step(batches)
    return [q.clip.detach().clone() for q in quantizers]


@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_first_batch_init_agrees_over_tp_and_dp(init):
    """Clips set from the first batch do not depend on the layout: TP=2 (sequence parallel) x DP=2,
    each rank holding half the channels or tokens of its replica's micro-batch, sets the clips one
    process with the same micro-batch size (and two of them per step) sets, on every rank; DP
    replicas used to reduce their own micro-batches, twice the samples. The learning rate is 0,
    so after the step the clips are the init's."""
    base = {**QAT, "qat": {**QAT["qat"], "init": init}, "optim": {"lr": 0.0, "min_lr": 0.0},
            "train": {"micro_batch_size": 2, "global_batch_size": 4}}
    ref = run_distributed(_clips_after_steps, 1, base, 1)[0]
    split = {**base, "parallel": {"tensor": 2, "sequence_parallel": True}}
    for out in run_distributed(_clips_after_steps, 4, split, 1):
        assert len(out) == len(ref) == 8
        for got, want in zip(out, ref):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert any(abs(c[0].item() + 2.0) > 0.1 for c in ref)     # not the constant init


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_first_batch_init_survives_the_optimizer(zero):
    """The clips a first-batch init sets reach the optimizer's own fp32 copy (ZeRO keeps one): after
    two steps they sit within two learning-rate steps of the init, not back near the constant."""
    over = {**QAT, "qat": {**QAT["qat"], "init": "mse"}, "parallel": {"zero_stage": zero}}
    init = list(run_distributed(_first_batch_clips, 1, {**over, "train": {"micro_batch_size": 2,
                                                                          "global_batch_size": 2}})[0].values())
    clips = run_distributed(_clips_after_steps, 1, over)[0]
    lr = 3e-3                                                    # tests.train_utils.TINY
    assert len(clips) == len(init) and any((c + 2.0).abs().max() > 0.1 for c in init)
    for got, want in zip(clips, init):
        assert (got - want).abs().max() <= 2.5 * lr, (got, want)


def test_mse_init_fits_each_input_scale():
    """init=mse clips sit where 4-bit quantization error is least: about 2.5 std for a Gaussian
    (the known optimum), inside the range of a bounded-below GELU output, scaled with the input;
    min/max clips have more error."""
    from qat.quantizer import InputQuantizer

    def clips(init, x):
        q = InputQuantizer(4, init, 2.0, splits_input=False)
        q._init_from_batch(x)
        return q.clip.detach()

    def error(x, clip):
        return (kernels.fake_quant_forward(x, clip, 4) - x).square().mean()

    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(2048, 96, generator=g)
    for scale in (0.05, 1.0, 20.0):
        lo, hi = clips("mse", gauss * scale)
        assert 2.0 * scale < hi < 3.0 * scale and -3.0 * scale < lo < -2.0 * scale
        assert error(gauss * scale, torch.stack([lo, hi])) < error(gauss * scale, clips("minmax", gauss * scale))
    gelu = torch.nn.functional.gelu(gauss)
    lo, hi = clips("mse", gelu)
    assert gelu.min() <= lo < -0.1 and hi < gelu.max()
    assert error(gelu, torch.stack([lo, hi])) < error(gelu, clips("minmax", gelu))


def _train_and_measure(overrides, steps=40):
    """Train briefly; return losses, clip values before/after and the mean output kurtosis of the
    residual-writing linears on a held-out batch."""
    from pretrain.engine import build_engine
    from pretrain.trainer import Trainer

    cfg, dims, model, quantizers, penalties = build({"model": {"hidden_size": 64, "seq_length": 32},
                                                     "train": {"steps": steps}, **overrides})
    clips0 = [q.clip.detach().clone() for q in quantizers]
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    batches = rank_micro_batches(global_samples(cfg, steps * cfg.train.global_batch_size), cfg.train.micro_batch_size)
    losses = [trainer.train_step(batches).item() for _ in range(steps)]
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
             for n, m in linears(model) if n.endswith(("proj", "fc2"))]
    held_out = next(rank_micro_batches(global_samples(cfg, 8, seed=1), 8))
    with torch.no_grad():
        model(held_out["tokens"])
    for h in hooks:
        h.remove()
    kurtosis = torch.stack([kernels.token_kurtosis(o.float()).mean() for o in outputs]).mean().item()
    return {"losses": losses, "clips0": clips0, "clips": [q.clip.detach() for q in quantizers], "kurtosis": kurtosis}


def test_short_run_moves_clips_lowers_loss_and_kurtosis_penalty_lowers_kurtosis():
    off = run_distributed(_train_and_measure, 1, QAT)[0]
    on = run_distributed(_train_and_measure, 1, {**QAT, "kurtosis": {"enabled": True, "lambda": 0.05}})[0]
    assert sum(off["losses"][-5:]) < 0.8 * sum(off["losses"][:5])
    assert max((a - b).abs().max().item() for a, b in zip(off["clips"], off["clips0"])) > 0.01
    assert on["kurtosis"] < 0.8 * off["kurtosis"], (on["kurtosis"], off["kurtosis"])


def _layer_metric_names(overrides):
    from pretrain.engine import build_engine
    from pretrain.trainer import Trainer

    cfg, dims, model, quantizers, penalties = build(overrides)
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    trainer.record_layer_stats(True)
    trainer.train_step(rank_micro_batches(global_samples(cfg, SAMPLES), cfg.train.micro_batch_size))
    names = set(trainer.interval_metrics()[1])
    quantizers[0].clip.data = torch.tensor([1.0, -1.0])        # crossed: the non-finite warning names it
    return names, trainer._inverted_clips()


@pytest.mark.parametrize("pipeline", [1, 2])
def test_layer_metrics_are_named_by_their_linear(pipeline):
    """Per-layer metrics carry the plain GPT's name of their linear under any layout (a pipeline
    stage names its layers by index): each stage has its own layers' metrics, together all of them;
    the non-finite-loss warning names crossed clips by layer too."""
    over = {**QAT_KURT, "qat": {**QAT["qat"], "layers": ["qkv", "proj", "fc1", "fc2", "output"]},
            "parallel": {"pipeline": pipeline}}
    block_linears = [f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    want = {f"qat/{n}/{k}" for n in block_linears + ["head.output"] for k in ("c_lo", "c_hi", "clipped")}
    want |= {f"kurtosis/{n}" for n in block_linears}
    stages, inverted = zip(*run_distributed(_layer_metric_names, pipeline, over))
    assert set().union(*stages) == want
    assert sum(len(s) for s in stages) == len(want)              # no layer on two stages
    if pipeline == 1:
        assert inverted == ("; the QAT quantizers of blocks.0.attn.qkv have inverted clips c_lo >= c_hi: "
                            "lower optim.lr or qat.init_value",)


def test_layer_metrics_reach_tensorboard_and_metrics_jsonl(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), 10, 64, 1e6, 1, 0.0, 0)
    layers = {"qat/blocks.3.mlp.fc1/c_lo": -1.5, "kurtosis/blocks.3.mlp.fc2": 3.25}
    logger.interval(5, {"train/loss": 2.0}, layers)
    logger.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": 5, "train/loss": 2.0, "layers": layers}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag, value in {**layers, "train/loss": 2.0}.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(5, value)], tag
