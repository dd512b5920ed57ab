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
