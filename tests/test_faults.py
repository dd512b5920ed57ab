"""Faults, for real: a signal mid-run saves and exits 0; a rank SIGKILLed during a save leaves the
previous checkpoint as the one to resume from; incomplete checkpoints are never loaded; non-finite
losses skip the step and too many in a row abort; bench/faults.py's kill-and-relaunch cycle does what
it reports.

Run as ``python -m tests.test_faults ARGS``, this module is ``pretrain.train`` except that rank 1
kills itself with SIGKILL in the middle of its $KILL_AT_SAVE-th checkpoint save.
"""
import functools
import os
import random
import signal
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from model.gpt import Head
from model.sharding import gather_state_dict
from pretrain.engine import AdamW, all_finite, build_engine
from pretrain.trainer import NonFiniteLossError, Trainer
from tests.data_utils import finish, losses, single, tiny_data, torchrun, train_args
from tests.dist_utils import run_distributed
from tests.train_utils import build, global_samples, rank_micro_batches


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under pid {launcher.pid}")


def _wait_for_steps(out_dir, n: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and len(losses(out_dir)) >= n):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before the signal"
        time.sleep(0.2)


@pytest.mark.parametrize("sig, rank", [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)], ids=["sigterm", "sigusr1"])
def test_signal_saves_and_exits_zero(data, tmp_path, sig, rank):
    proc = torchrun(2, train_args(data, str(tmp_path), "--train.steps", "500"))
    _wait_for_steps(tmp_path, 2, proc)
    _worker(psutil.Process(proc.pid), rank).send_signal(sig)    # one rank only: the others learn it
    code, log = finish(proc)
    assert code == 0, log
    last = max(losses(tmp_path))
    assert 2 <= last < 500 and f"stopped at step {last} (signal)" in log
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == f"step{last:08d}" and (root / f"step{last:08d}" / "COMPLETE").exists()
    code, log = finish(torchrun(2, train_args(data, str(tmp_path), "--train.steps", "500",
                                              "--train.stop_at_step", str(last + 1))))
    assert code == 0 and f"resumed from {root / f'step{last:08d}'}" in log, log


def test_sigkill_during_save_resumes_from_previous_checkpoint(data, tmp_path):
    args = train_args(data, str(tmp_path), "--train.steps", "6", "--checkpoint.interval", "2")
    code, log = finish(torchrun(2, args, module="tests.test_faults", env={"KILL_AT_SAVE": "2"}))
    assert code != 0 and "SIGKILL" in log, log
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step00000002"
    assert (root / "step00000004").is_dir() and not (root / "step00000004" / "COMPLETE").exists()
    before = losses(tmp_path)
    assert sorted(before) == [1, 2, 3, 4]

    # An explicit path to the torn checkpoint is refused; auto skips it even when `latest` names it.
    code, log = finish(single([*args, "--resume", str(root / "step00000004")]))
    assert code == 2 and "incomplete (no COMPLETE marker): refusing to load it" in log, log
    (root / "latest").write_text("step00000004")
    code, log = finish(torchrun(2, args))
    assert code == 0 and f"resumed from {root / 'step00000002'} at step 2" in log, log
    after = losses(tmp_path)
    assert sorted(after) == list(range(1, 7))
    assert after[3] == before[3] and after[4] == before[4]      # the same trajectory as before the crash
    assert (root / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000002", "step00000004", "step00000006"]
    assert all((root / n / "COMPLETE").exists() for n in ("step00000004", "step00000006"))


def _nonfinite_run(overrides: dict, poisoned: set[int], steps: int) -> dict:
    """Train with the LM head's output turned to NaN on the ``poisoned`` steps (on the stage that
    holds the head); return per-step losses, whether weights moved, and any abort message."""
    cfg, dims, model, quantizers, penalties = build(overrides)
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    for head in (m for m in model.modules() if isinstance(m, Head)):
        head.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step in poisoned else out)
    batches = rank_micro_batches(global_samples(cfg, steps * cfg.train.global_batch_size), cfg.train.micro_batch_size)
    record = {"losses": [], "moved": [], "error": None}
    try:
        for _ in range(steps):
            before = gather_state_dict(model)
            record["losses"].append(trainer.train_step(batches).item())
            after = gather_state_dict(model)
            record["moved"].append(any(not torch.equal(before[n], after[n]) for n in before))
    except NonFiniteLossError as e:
        record["error"] = str(e)
    record["skipped"] = trainer.skipped_steps
    return record


@pytest.mark.parametrize("world, parallel, bf16", [(1, {"zero_stage": 0}, False), (2, {"pipeline": 2, "zero_stage": 1}, False),
                                                 (2, {"zero_stage": 1}, True), (2, {"zero_stage": 2}, True)],
                         ids=["zero0", "pp2-zero1", "dp2-zero1-bf16", "dp2-zero2-bf16"])
def test_nonfinite_loss_skips_the_step_and_repeated_ones_abort(world, parallel, bf16):
    """bf16 under ZeRO has no DeepSpeed overflow check (engine.deepspeed_config): AdamW skips."""
    over = {"train": {"max_nonfinite_steps": 2, "bf16": bf16}, "parallel": parallel}
    for rec in run_distributed(_nonfinite_run, world, over, {1, 3, 4}, 6):
        assert rec["moved"] == [True, False, True, False] and rec["skipped"] == 3
        assert [v != v for v in rec["losses"]] == [False, True, False, True]   # NaN on steps 1 and 3
        assert "2 steps in a row (up to step 5) had a non-finite loss or gradient (train.max_nonfinite_steps=2): aborting" \
            in rec["error"]


def _one_gradient_poisoned(overrides: dict) -> tuple[list[list[bool]], int]:
    """Two steps; on the first, rank 1 alone gets a NaN in one gradient element of one norm gain
    (a parameter group without weight decay), with a finite loss. Returns, per step, whether each
    fp32 master weight moved (this rank's ZeRO partitions, where a bf16 weight hides one step's
    decay; the parameters themselves without ZeRO), and the trainer's count of skipped steps."""
    cfg, dims, model, quantizers, penalties = build(overrides)
    trainer = Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)
    gain = next(p for n, p in model.named_parameters() if p.ndim == 1 and "norm" in n)

    def poison(grad):
        if trainer.step == 0 and dist.get_rank() == 1:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad
    gain.register_hook(poison)
    batches = rank_micro_batches(global_samples(cfg, 2 * cfg.train.global_batch_size), cfg.train.micro_batch_size)
    master = getattr(trainer.engine.optimizer, "single_partition_of_fp32_groups", None) or list(model.parameters())
    moved = []
    for _ in range(2):
        before = [t.detach().clone() for t in master]
        trainer.train_step(batches)
        moved.append([not torch.equal(a, b) for a, b in zip(before, master)])
    return moved, trainer.skipped_steps


@pytest.mark.parametrize("parallel, bf16", [({"zero_stage": 1}, True), ({"zero_stage": 2}, True), ({"zero_stage": 0}, False)],
                         ids=["zero1-bf16", "zero2-bf16", "zero0"])
def test_one_nonfinite_gradient_on_one_rank_skips_every_group_everywhere(parallel, bf16):
    """A NaN confined to one parameter group on one rank, under a finite loss, skips the whole update
    on every rank, and the trainer counts the skip; the next step trains. bf16 ZeRO-1/2 (AdamW clips
    and skips on the device): the global norm is inf, and clipping by it would zero the other
    groups' gradients while weight decay and momentum still moved them. ZeRO-0: AdamW's own check."""
    over = {"model": {"dropout": 0.0}, "train": {"bf16": bf16}, "parallel": parallel}
    for moved, skipped in run_distributed(_one_gradient_poisoned, 2, over):
        assert not any(moved[0]) and all(moved[1]) and skipped == 1, (moved, skipped)
        assert len(moved[0]) == 2 or not parallel["zero_stage"]      # ZeRO: the decay and no-decay groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_all_finite_sees_one_nonfinite_value_and_no_overflow(dtype):
    big = torch.finfo(dtype).max
    base = [torch.randn(64, 33).to(dtype), torch.randn(5).to(dtype), torch.empty(0, dtype=dtype)]
    assert all_finite(base).item() and all_finite(base + [torch.full((7,), big, dtype=dtype)]).item()
    assert all_finite([torch.empty(0, dtype=dtype)]).item()
    for value in (float("nan"), float("inf"), float("-inf")):
        grads = [t.clone() for t in base]
        grads[0][40, 17] = value
        assert not all_finite(grads).item(), value
        assert not all_finite([torch.ones(3, dtype=torch.float64), torch.ones(2)] + grads).item(), value


def _params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape).to(dtype)) for shape in ((16, 8), (8,), (3, 5))]


def _adamw_step(cls, dtype, poison):
    """One step of ``cls`` over three parameters whose gradients are random, except one element of
    the second set to ``poison``; returns (step's result, parameters after, optimizer state)."""
    params = _params(dtype)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape).to(dtype)
        if i == 1 and poison is not None:
            p.grad[3] = poison
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    return opt.step(), [p.detach().clone() for p in params], opt.state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adamw_skips_exactly_when_one_gradient_is_nonfinite(dtype):
    initial = _params(dtype)
    for value in (float("nan"), float("inf"), float("-inf")):
        result, after, state = _adamw_step(AdamW, dtype, value)
        assert result is None and not state, value
        assert all(torch.equal(a, b) for a, b in zip(after, initial)), value
    for value in (None, 1e30):
        result, after, state = _adamw_step(AdamW, dtype, value)
        _, expected, _ = _adamw_step(functools.partial(torch.optim.AdamW, fused=True), dtype, value)
        assert len(state) == 3 and all(s["step"].item() == 1 for s in state.values())
        assert all(torch.equal(a, b) for a, b in zip(after, expected))
        assert all(torch.isfinite(a).all() and not torch.equal(a, b) for a, b in zip(after, initial))


@pytest.mark.parametrize("norm", [float("nan"), float("inf"), 2.5, 0.5], ids=["nan", "inf", "clipped", "unclipped"])
def test_adamw_clip_by_global_norm_skips_or_clips(norm):
    """``clip_by`` (bf16 ZeRO-1/2): a non-finite global norm skips the update with no host read
    (the weights and the step count stay); a finite one scales the gradients by
    max_norm / (norm + 1e-6) when above max_norm, as DeepSpeed does, then steps."""
    params, initial = _params(torch.float32), _params(torch.float32)
    for p in params:
        p.grad = torch.randn(p.shape)
    grads = [p.grad.clone() for p in params]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    opt.clip_by = (1.0, lambda: torch.tensor(norm))
    opt.step()
    if norm != norm or norm == float("inf"):
        assert all(torch.equal(a, b) for a, b in zip(params, initial))
        assert all(s["step"].item() == 0 for s in opt.state.values())
        return
    ref = [torch.nn.Parameter(p.detach().clone()) for p in initial]
    for r, g in zip(ref, grads):
        r.grad = g / max(1.0, norm + 1e-6)      # max_norm 1
    torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True).step()
    assert all(s["step"].item() == 1 for s in opt.state.values())
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(params, initial))


def _adamw_poisoned_on_rank(bad_rank: int) -> bool:
    """Rank ``bad_rank`` alone holds a NaN gradient; returns whether this rank's weights moved."""
    dist.init_process_group("gloo")
    params = _params(torch.float32)
    for p in params:
        p.grad = torch.ones_like(p)
    if dist.get_rank() == bad_rank:
        params[2].grad[1, 4] = float("nan")
    before = [p.detach().clone() for p in params]
    AdamW(params, lr=1e-2).step()
    return any(not torch.equal(a, b) for a, b in zip(params, before))


def test_adamw_one_rank_nonfinite_skips_every_rank():
    assert run_distributed(_adamw_poisoned_on_rank, 2, 1) == [False, False]
    assert run_distributed(_adamw_poisoned_on_rank, 2, -1) == [True, True]


def test_fault_bench_kills_the_whole_tree_and_resumes(data, tmp_path):
    """bench/faults.py's cycle once per signal: no process of a killed launch survives (its wait()
    checks the whole tree), each relaunch resumes from the newest checkpoint, SIGTERM saves the step
    it stopped at and exits 0, and the final-weights comparison tells checkpoints apart."""
    from bench.faults import INTERVAL, STEPS_PER_KILL, compare_checkpoints, run_with_faults
    steps = 3 * STEPS_PER_KILL
    kill, term = run_with_faults(data, str(tmp_path), steps, ["SIGKILL", "SIGTERM"], random.Random(0),
                                 progress=lambda line: None)
    assert kill["exit_code"] == -signal.SIGKILL and kill["resumed_from"] == kill["newest_checkpoint"], kill
    assert 0 <= kill["steps_lost"] <= INTERVAL, kill          # at most one checkpoint interval
    assert term["exit_code"] == 0 and term["saved_and_exited_0"], term
    assert term["resumed_from"] == term["at_kill"] and term["steps_lost"] == 0, term
    root = tmp_path / "checkpoints"
    final, earlier = root / f"step{steps:08d}", root / f"step{steps - INTERVAL:08d}"
    assert compare_checkpoints(str(final), str(final)) == {"weights": True, "optimizer": True}
    assert compare_checkpoints(str(final), str(earlier)) == {"weights": False, "optimizer": False}


if __name__ == "__main__":
    import sys

    from pretrain import checkpoint, train

    save_rng, saves = checkpoint._rng_state, []

    def _dying_rng_state():   # called by checkpoint.save after DeepSpeed wrote this rank's shards
        saves.append(1)
        if os.environ["RANK"] == "1" and len(saves) == int(os.environ["KILL_AT_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng()

    checkpoint._rng_state = _dying_rng_state
    sys.exit(train.main())
