"""Pipeline parallelism (DeepSpeed's PipelineModule, 1F1B) is exact: same initial weights and data
give the same losses, gradient norms and final weights as one process, alone and composed with
TP, with QAT + kurtosis on, and with activation checkpointing (fp32, gloo, real collectives)."""
import pytest
import torch

from tests.dist_utils import run_distributed
from tests.train_utils import initial_state, run

STEPS = 4
TOL = {"atol": 1e-5, "rtol": 1e-4}
# Adam divides each gradient by its own running RMS, so an element whose gradient sits at fp32
# rounding level moves by up to ~lr (3e-3) in a direction set by that rounding: final weights are
# compared at 1/30 of lr (a missing or doubled gradient reduction moves them by ~lr per step).
WEIGHT_TOL = {"atol": 1e-4, "rtol": 1e-4}


def _reference(base: dict) -> tuple[dict, dict]:
    full = run_distributed(initial_state, 1, base)[0]
    return full, run_distributed(run, 1, base, full, STEPS)[0]


def _check(ref: dict, outs: list[dict]) -> None:
    final = {}
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref["losses"]), **TOL)
        torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]), **TOL)
        final.update(out["final"])                  # each stage holds its own layers
    assert final.keys() == ref["final"].keys()
    for name, p in ref["final"].items():
        torch.testing.assert_close(final[name], p, **WEIGHT_TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert ref["losses"][-1] < ref["losses"][0]


def _with(base: dict, **parallel) -> dict:
    return {**base, "parallel": {"zero_stage": 1, **parallel}}


QUANT = {"qat": {"enabled": True}, "kurtosis": {"enabled": True, "lambda": 0.05}}


@pytest.mark.parametrize("partition", ["parameters", "type:Block"])
def test_pp2_matches_pp1_with_qat_and_kurtosis(partition):
    """Two micro-batches per step, so the kurtosis gradient scale (1 / micro-batches) matters."""
    base = {"model": {"num_layers": 3}, **QUANT}
    full, ref = _reference(base)
    _check(ref, run_distributed(run, 2, _with(base, pipeline=2, partition=partition), full, STEPS))


def test_tp2_pp2_on_four_ranks_matches_one():
    base = {"model": {"num_layers": 2}}
    full, ref = _reference(base)
    _check(ref, run_distributed(run, 4, _with(base, tensor=2, pipeline=2), full, STEPS))


def test_initial_weights_do_not_depend_on_the_layout():
    """Every TP x PP layout starts from the one-process model (each pipeline layer draws its weights
    from its own seed), so training runs under different layouts are comparable from step 0."""
    base = {"model": {"num_layers": 3}, **QUANT}
    ref = run_distributed(initial_state, 1, base)[0]
    full = {}
    for stage in run_distributed(initial_state, 4, _with(base, tensor=2, pipeline=2)):
        full.update(stage)
    assert full.keys() == ref.keys()
    for name, p in ref.items():
        assert torch.equal(full[name], p), name


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_with_and_without_pipeline(mode):
    base = {"model": {"num_layers": 2}, **QUANT}
    full, ref = _reference(base)
    ckpt = {**base, "train": {"activation_checkpointing": mode}}
    _check(ref, run_distributed(run, 1, ckpt, full, STEPS))
    _check(ref, run_distributed(run, 2, _with(ckpt, pipeline=2), full, STEPS))
