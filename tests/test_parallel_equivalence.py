"""Tensor parallelism and ZeRO are exact: same initial weights and data give the same gradients
and the same loss trajectory as one process (fp32, gloo, real collectives)."""
import pytest
import torch

from tests.dist_utils import run_distributed
from tests.train_utils import initial_state, run

STEPS = 4


def _compare(ref: dict, out: dict, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), atol=atol, rtol=rtol)
    torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]), atol=atol, rtol=rtol)
    assert min(ref["grad_norms"]) > 0.3        # the clip threshold: clipping was active, so the norm mattered
    assert ref["grads"].keys() == out["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(out["grads"][name], g, atol=atol, rtol=rtol, msg=name)


def _tp_case(model_over: dict, extra: dict, sp: bool):
    base = {"model": {"dropout": 0.0, **model_over}, **extra}
    full = run_distributed(initial_state, 1, base)[0]
    ref = run_distributed(run, 1, base, full, STEPS)[0]
    tp2 = {**base, "parallel": {"tensor": 2, "sequence_parallel": sp, "zero_stage": 1}}
    outs = run_distributed(run, 2, tp2, full, STEPS)
    for out in outs:
        _compare(ref, out)
    assert ref["losses"][-1] < ref["losses"][0]      # the runs really train
    return ref, outs


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_single_process(sp):
    _tp_case({}, {}, sp)


def test_tensor_parallel_swiglu_rope_rmsnorm_no_bias():
    _tp_case({"mlp": "swiglu", "positions": "rope", "norm": "rmsnorm", "bias": False}, {}, sp=True)


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_over_two_ranks_matches_one(zero):
    base = {"model": {"dropout": 0.0}}
    full = run_distributed(initial_state, 1, base)[0]
    ref = run_distributed(run, 1, base, full, STEPS)[0]
    outs = run_distributed(run, 2, {**base, "parallel": {"zero_stage": zero}}, full, STEPS)
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]), atol=1e-5, rtol=1e-4)
        for name, p in ref["final"].items():
            torch.testing.assert_close(out["final"][name], p, atol=1e-5, rtol=1e-4, msg=name)


def _run_clipped_by_deepspeed(overrides: dict, full_state: dict, steps: int) -> dict:
    """`run` with DeepSpeed clipping (its `unscale_and_clip_grads`) and AdamW's own finiteness check,
    as before AdamW clipped from DeepSpeed's norm."""
    import pretrain.engine
    pretrain.engine.clips_in_adamw = lambda cfg, dims: False
    return run(overrides, full_state, steps)


@pytest.mark.parametrize("zero", [1, 2])
def test_adamw_clipping_matches_deepspeed_bit_for_bit(zero):
    """bf16 under ZeRO-1/2 clips in AdamW from DeepSpeed's global norm (engine.clips_in_adamw): the
    same losses, gradient norms and final weights, to the bit, as DeepSpeed clipping (DP=2)."""
    base = {"model": {"dropout": 0.0}, "train": {"bf16": True}, "parallel": {"zero_stage": zero}}
    full = run_distributed(initial_state, 1, base)[0]
    ours = run_distributed(run, 2, base, full, STEPS)
    theirs = run_distributed(_run_clipped_by_deepspeed, 2, base, full, STEPS)
    assert min(theirs[0]["grad_norms"]) > 0.3        # clipping was active on every step
    for a, b in zip(ours, theirs):
        assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
        assert a["final"].keys() == b["final"].keys()
        for name, p in b["final"].items():
            assert torch.equal(a["final"][name], p), name


def _grad_norms_both_ways(overrides: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """After one forward-backward: each parameter group's gradient norm over this rank's ZeRO
    partition by engine.fused_grad_norm and by DeepSpeed's get_grad_norm_direct; then again with
    one gradient element made inf on rank 1."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from pretrain.engine import build_engine, fused_grad_norm
    from tests.train_utils import build, global_samples, rank_micro_batches

    cfg, dims, model, _, _ = build(overrides)
    engine = build_engine(model, cfg, dims)
    zero = engine.optimizer
    batch = next(rank_micro_batches(global_samples(cfg, cfg.train.global_batch_size), cfg.train.micro_batch_size))
    engine.backward(engine(batch["tokens"], batch["labels"]))
    out = []
    for poisoned in (False, True):
        if poisoned and dist.get_rank() == 1:
            zero.averaged_gradients[0][0].view(-1)[0] = float("inf")
        for i, params in enumerate(zero.params_in_partition):
            grads = zero.averaged_gradients[i]
            out.append((fused_grad_norm(zero, grads, params),
                        DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, grads, params)))
    return out


@pytest.mark.parametrize("parallel", [{"zero_stage": 1}, {"zero_stage": 2}, {"zero_stage": 1, "tensor": 2}],
                         ids=["zero1-dp2", "zero2-dp2", "zero1-tp2"])
def test_fused_grad_norm_matches_deepspeeds(parallel):
    """The norm the ZeRO step clips and checks by (engine.fused_grad_norm, installed by build_engine)
    equals DeepSpeed's own, counting TP-replicated parameters once, and is its -1 when a gradient
    on any rank is not finite."""
    dp = 2 // parallel.get("tensor", 1)
    over = {"model": {"dropout": 0.0}, "train": {"bf16": True, "micro_batch_size": 2, "global_batch_size": 2 * dp},
            "parallel": parallel}
    for rank_norms in run_distributed(_grad_norms_both_ways, 2, over):
        finite, poisoned = rank_norms[:len(rank_norms) // 2], rank_norms[len(rank_norms) // 2:]
        assert len(finite) == 2                                   # the decay and no-decay groups
        for ours, theirs in finite:
            assert ours.dtype == theirs.dtype == torch.float32 and ours > 0
            torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0)
        assert [float(n) for n in poisoned[0]] == [-1.0, -1.0]   # every rank sees rank 1's inf
        for ours, theirs in poisoned[1:]:
            torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0)
