"""QAT and kurtosis regularization in the model: exact gradients, no extra saved activations,
tensor-parallel equivalence (clip values included), and their effect in a short training run."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from model.gpt import linears
from tests.dist_utils import run_distributed
from tests.train_utils import build, global_samples, initial_state, rank_micro_batches, run

QAT = {"qat": {"enabled": True, "bits": 4, "init_value": 2.0}}
QAT_KURT = {**QAT, "kurtosis": {"enabled": True, "lambda": 0.05, "sites": "all", "reduce": "mean"}}


def _linear_grads_with_and_without_recompute():
    """One QAT Linear: gradients through the quantizer's x_hat-recompute path vs plain autograd
    over the same math."""
    _, _, model, quantizers, _ = build(QAT)
    name, linear = linears(model)[0]
    q = linear.input_quant
    with torch.no_grad():
        q.clip.copy_(torch.tensor([-0.7, 0.9]))
    x = torch.randn(5, 3, linear.weight.shape[1], requires_grad=True)
    g = torch.randn(5, 3, linear.weight.shape[0])
    (linear(x) * g).sum().backward()
    ours = [x.grad.clone(), linear.weight.grad.clone(), q.clip.grad.clone()]
    for t in (x, linear.weight, q.clip):
        t.grad = None
    x_hat = kernels.fake_quant(x, q.clip[0], q.clip[1], q.bits, impl="torch")
    (F.linear(x_hat, linear.weight, linear.linear.bias) * g).sum().backward()
    return ours, [x.grad, linear.weight.grad, q.clip.grad]


def test_recomputed_quantized_input_gives_exact_gradients():
    ours, ref = run_distributed(_linear_grads_with_and_without_recompute, 1)[0]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ref[2].abs().sum() > 0          # the clips really get gradient


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


def _inputs_pinned_after_forward(mode):
    """How many QAT linear inputs the autograd graph keeps for recomputing x_hat after a forward
    with activation checkpointing ``mode`` (each recipe pins one input's storage); and whether the
    clip gradients still arrive."""
    import gc

    from pretrain.parallelize import checkpoint_activations
    from quant.qat import _Recompute

    cfg, _, model, quantizers, _ = build(QAT)
    checkpoint_activations(model, mode)
    batch = next(rank_micro_batches(global_samples(cfg, cfg.train.micro_batch_size), cfg.train.micro_batch_size))
    loss = model(batch["tokens"], batch["labels"])
    pinned = sum(isinstance(o, _Recompute) for o in gc.get_objects())
    loss.backward()
    return pinned, all(q.clip.grad is not None for q in quantizers)


def test_checkpointing_leaves_quantized_inputs_to_the_checkpoint():
    assert run_distributed(_inputs_pinned_after_forward, 1, "none")[0] == (8, True)   # 2 blocks x 4 linears
    assert run_distributed(_inputs_pinned_after_forward, 1, "full")[0] == (0, True)
    assert run_distributed(_inputs_pinned_after_forward, 1, "selective")[0] == (4, True)  # attention keeps its own


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
