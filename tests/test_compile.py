"""train.compile (each block under torch.compile, the QAT / kurtosis kernels as custom ops) is
exact: the same losses, per-layer statistics, gradients and weights as eager over a few steps
(fp32, QAT + kurtosis on, clip init from the first batch; alone and under PP=2), one graph per
block with no breaks, the custom ops pass torch.library.opcheck, and a stopped and resumed compiled
run equals an uninterrupted one. Inductor on CPU compiles slowly: the training tests are few and tiny."""
import pytest
import torch

from tests.data_utils import finish, losses, single, tiny_data, train_args
from tests.dist_utils import run_distributed
from tests.train_utils import build, global_samples, initial_state, load_full_state, rank_micro_batches

STEPS = 3
QAT = {"model": {"dropout": 0.0}, "qat": {"enabled": True, "init": "mse"},
       "kurtosis": {"enabled": True, "lambda": 0.01}}


def _train(overrides: dict, full_state: dict, steps: int) -> dict:
    """Losses and per-layer metrics of ``steps`` trainer steps (layer stats from the second on),
    then the gradients of one more micro-batch by plain autograd, the final weights and dynamo's
    graph and graph-break counts."""
    from torch._dynamo.utils import counters

    from model.sharding import gather_state_dict
    from pretrain.engine import build_engine
    from pretrain.trainer import Trainer

    cfg, dims, model, quantizers, penalties = build(overrides)
    load_full_state(model, full_state)
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    batches = rank_micro_batches(global_samples(cfg, (steps + 1) * cfg.train.global_batch_size),
                                 cfg.train.micro_batch_size)
    metrics = []
    for step in range(steps):
        trainer.record_layer_stats(step > 0)
        trainer.train_step(batches)
        metrics.append(trainer.interval_metrics())
    batch = next(batches)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(batch["tokens"], batch["labels"]), list(params.values()))
    return {"metrics": metrics, "grads": dict(zip(params, grads)), "final": gather_state_dict(model),
            "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def test_compiled_training_matches_eager():
    full = run_distributed(initial_state, 1, QAT)[0]
    eager = run_distributed(_train, 1, QAT, full, STEPS)[0]
    compiled = run_distributed(_train, 1, {**QAT, "train": {"compile": True}}, full, STEPS)[0]
    assert eager["graphs"] == 0 and compiled["graphs"] > 0 and compiled["breaks"] == 0
    for (ref, ref_layers), (out, out_layers) in zip(eager["metrics"], compiled["metrics"]):
        for key in ("train/loss", "train/grad_norm"):
            assert out[key] == pytest.approx(ref[key], rel=1e-6), key
        assert out_layers.keys() == ref_layers.keys()
        for key, v in ref_layers.items():
            assert out_layers[key] == pytest.approx(v, rel=1e-5, abs=1e-7), key
    assert any(k.startswith("kurtosis/") for k in eager["metrics"][-1][1])
    assert any(k.endswith("/clipped") for k in eager["metrics"][-1][1])
    for name, g in eager["grads"].items():
        torch.testing.assert_close(compiled["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
    for name, p in eager["final"].items():
        torch.testing.assert_close(compiled["final"][name], p, rtol=1e-5, atol=1e-6, msg=name)


def _explain_block(model_over: dict):
    cfg, _, model, _, _ = build({**QAT, "model": {**QAT["model"], **model_over}})
    block = model.blocks[0]
    x = torch.randn(cfg.model.seq_length, 2, cfg.model.hidden_size)
    with torch.no_grad():
        block(x)                                  # clip inits (eager, as the trainer does them)
    out = torch._dynamo.explain(block)(x.requires_grad_())
    return out.graph_count, out.graph_break_count, [r.reason for r in out.break_reasons]


def test_block_traces_as_one_graph_swiglu_rope_rmsnorm_no_bias():
    graphs, breaks, reasons = run_distributed(_explain_block, 1, {"mlp": "swiglu", "positions": "rope",
                                                                  "norm": "rmsnorm", "bias": False})[0]
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("count", [False, True])
def test_custom_ops_pass_opcheck(impl, count):
    from kernels.mlp_act import _act_fake_quant_backward_op, _act_fake_quant_op
    from kernels.fake_quant import _fake_quant_backward_op, fake_quant_op
    from kernels.kurtosis import _grad_op, _moments_op
    from kernels.norm_quant import _norm_fake_quant_backward_op, _norm_fake_quant_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 16, generator=g)
    clip = torch.tensor([-1.0, 1.2], requires_grad=True)
    w, b = torch.randn(16, generator=g).requires_grad_(), torch.randn(16, generator=g).requires_grad_()
    xr = x.clone().requires_grad_()
    attention_layout = torch.randn(2, 6, 16, generator=g).transpose(0, 1)   # rows at two strides
    x2d = x.reshape(-1, 16)
    cases = [(fake_quant_op, (xr, clip, 4, impl, count)),
             (fake_quant_op, (attention_layout, clip, 4, impl, count)),
             (_fake_quant_backward_op, (attention_layout, torch.randn(6, 2, 16, generator=g), clip.detach(), 4, impl)),
             (_act_fake_quant_op, (xr, clip, False, 4, impl, count)),
             (_act_fake_quant_op, (xr, clip, True, 4, impl, count)),
             (_act_fake_quant_backward_op, (x, torch.randn(6, 2, 8, generator=g), clip.detach(), 4, True, impl))]
    for bias, center in ((b, True), (None, True), (None, False)):
        cases.append((_norm_fake_quant_op, (x2d.clone().requires_grad_(), w, bias, clip, 1e-5, center, 4, impl,
                                            count)))
        with torch.no_grad():
            _, mean, rstd, _ = _norm_fake_quant_op(x2d, w, bias, clip, 1e-5, center, 4, impl, False)
        cases.append((_norm_fake_quant_backward_op, (x2d, torch.randn(12, 16, generator=g), w.detach(),
                                                     bias.detach() if bias is not None else None, clip.detach(),
                                                     mean, rstd, 4, impl)))
    kappa, stats = _moments_op(x2d, 1e-20, impl)
    cases += [(_moments_op, (x2d, 1e-20, impl)),
              (_grad_op, (x2d, stats, 0.3, torch.randn(12, 16, generator=g), impl, 1e-20)),
              (_grad_op, (x2d, stats, 0.3, None, impl, 1e-20)),
              (_grad_op, (x2d, None, 0.3, torch.randn(12, 16, generator=g), impl, 1e-20))]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def test_compiled_stop_and_resume_is_bitwise_exact(data, tmp_path):
    n = 2
    extra = ["--train.steps", str(2 * n), "--train.compile", "true", "--kurtosis.lambda", "0.01"]

    def run(out, *more):
        code, log = finish(single(train_args(data, str(tmp_path / out), *extra, *more)), timeout=600)
        assert code == 0, log
        return log

    run("straight")
    run("split", "--train.stop_at_step", str(n))
    assert "resumed from" in run("split")
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 2 * n + 1))
    assert split == straight                        # float equality of every step's loss
    assert len(set(straight.values())) == 2 * n


def _run_counted(overrides: dict, full_state: dict, steps: int) -> dict:
    """tests.train_utils.run, with dynamo's graph and graph-break counts."""
    from torch._dynamo.utils import counters

    from tests.train_utils import run

    out = run(overrides, full_state, steps)
    return {**out, "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def test_compiled_pipeline_matches_eager_pipeline():
    """PP=2 (1F1B over two micro-batches, QAT + kurtosis): the stages' compiled blocks give the
    eager pipeline's losses, gradient norms and final weights."""
    base = {**QAT, "model": {**QAT["model"], "num_layers": 3}, "parallel": {"pipeline": 2, "zero_stage": 1}}
    full = run_distributed(initial_state, 1, {k: v for k, v in base.items() if k != "parallel"})[0]
    eager = run_distributed(_run_counted, 2, base, full, STEPS)
    compiled = run_distributed(_run_counted, 2, {**base, "train": {"compile": True}}, full, STEPS)
    for ref, out in zip(eager, compiled):
        assert ref["graphs"] == 0 and out["graphs"] > 0 and out["breaks"] == 0
        assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        assert out["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        assert out["final"].keys() == ref["final"].keys()
        for name, p in ref["final"].items():
            torch.testing.assert_close(out["final"][name], p, rtol=1e-5, atol=1e-6, msg=name)
