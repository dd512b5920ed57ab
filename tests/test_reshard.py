"""Resume under another parallel layout (checkpoint.reshard), through pretrain.run.train on real gloo
processes: TP=2 -> 1, PP=2 -> 1, DP=2 -> 1 (ZeRO-1, and ZeRO-2), TP, PP, DP = 1 -> 2 and TP=2 -> DP=2
continue as the uninterrupted run under the new layout from the same initial weights: the same
losses (fp32, to 1e-6 relative), the same samples in the same order (none repeated or skipped), and
right after loading the very model and optimizer state the checkpoint holds, bit for bit; without
checkpoint.reshard the change is refused, and so are ZeRO-0 and a model of another shape under it.

QAT (clips initialized from data, qat.init mse) and the kurtosis penalty are on (configs/tiny.yaml).
The runs share three process groups: one of 2 ranks writes the sources, each running on to 2N
steps as the uninterrupted run of its layout; one of 1 rank the TP=1 run (also a source) and the
resumes into it; one of 2 ranks the resumes into 2-rank layouts."""
import logging

import pytest
import torch

from tests.data_utils import losses, tiny_data, train_args
from tests.dist_utils import run_distributed

N = 3                                     # steps before the checkpoint, and after it
SOURCES = {"tp2": ["--parallel.tensor", "2"], "pp2": ["--parallel.pipeline", "2"], "dp2": [],
           "dp2-zero2": ["--parallel.zero_stage", "2"]}
LAYOUTS = {"tp1": "TP 1 x PP 1 x DP 1", "tp2": "TP 2 x PP 1 x DP 1", "pp2": "TP 1 x PP 2 x DP 1",
           "dp2": "TP 1 x PP 1 x DP 2", "dp2-zero2": "TP 1 x PP 1 x DP 2"}
# case: (source checkpoint, the uninterrupted run of the new layout, the resume's own arguments)
CASES = {"tp2-tp1": ("tp2", "tp1", []), "pp2-pp1": ("pp2", "tp1", []), "dp2-dp1": ("dp2", "tp1", []),
         "dp2-dp1-zero2": ("dp2-zero2", "tp1", ["--parallel.zero_stage", "2"]),
         "tp1-tp2": ("tp1", "tp2", ["--parallel.tensor", "2"]), "tp1-pp2": ("tp1", "pp2", ["--parallel.pipeline", "2"]),
         "tp1-dp2": ("tp1", "dp2", []), "tp2-dp2": ("tp2", "dp2", [])}     # the last: a TP merge and a DP split at once


def _ckpt(root, run: str) -> str:
    return f"{root}/{run}/checkpoints/step{N:08d}"


def _runs(data: str, root: str, jobs: list) -> dict:
    """Each job in turn on these processes: ``(name, kind, args)``; kind ``train`` runs
    pretrain.run.train on ``args`` (what the command line passes) with out_dir ROOT/NAME, recording
    the micro-batches this rank trains on, its warnings and a refusal's message; kind ``save`` resumes
    ``args`` and saves at once, without a step."""
    from megatron.core import parallel_state

    import pretrain.run as run
    from pretrain import checkpoint
    from pretrain.config import ConfigError, load_config, validate, world_size_from_env
    from pretrain.parallel_dims import init_distributed

    tokens, warnings, real = [], [], run.micro_batches

    def recorded(*args):
        for batch in real(*args):
            tokens.append(batch["tokens"])
            yield batch

    run.micro_batches = recorded
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("pretrain").addHandler(handler)
    out = {}
    for name, kind, extra in jobs:
        tokens.clear()
        warnings.clear()
        args = train_args(data, f"{root}/{name}", "--train.steps", str(2 * N), *extra)
        cfg = load_config(args[1], args[2:])
        validate(cfg, world_size_from_env())
        dims = init_distributed(cfg.parallel)
        error = None
        try:
            if kind == "train":
                run.train(cfg, dims)
            else:
                trainer = run.build_trainer(cfg, dims)
                checkpoint.resume(trainer.engine, trainer, cfg)
                checkpoint.save(trainer.engine, trainer, cfg, trainer.engine.module)
        except ConfigError as e:
            error = str(e)
        out[name] = {"error": error, "tokens": list(tokens), "warnings": list(warnings),
                     "dp": parallel_state.get_data_parallel_rank(), "tp": parallel_state.get_tensor_model_parallel_rank(),
                     "first_stage": parallel_state.is_pipeline_first_stage()}
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{job: [each rank's record]} of every run of this file."""
    data, root = tiny_data(tmp_path_factory), str(tmp_path_factory.mktemp("reshard"))
    interval = ["--checkpoint.interval", str(N)]
    first = [(name, "train", [*args, *interval]) for name, args in SOURCES.items()]
    resume = {case: ["--checkpoint.resume", _ckpt(root, src), "--checkpoint.reshard", "true", *args]
              for case, (src, _, args) in CASES.items()}
    into_tp1 = [case for case, (_, new, _) in CASES.items() if new == "tp1"]
    into_world2 = [case for case in CASES if case not in into_tp1]
    second = ([("tp1", "train", interval)] + [(case, "train", resume[case]) for case in into_tp1]
              + [(f"{case}-state", "save", resume[case]) for case in into_tp1]
              + [(f"{src}-refused", "train", ["--checkpoint.resume", _ckpt(root, src)]) for src in ("tp2", "pp2", "dp2")]
              + [(f"tp2-{what}", "train", resume["tp2-tp1"] + args)
                 for what, args in (("zero0", ["--parallel.zero_stage", "0"]), ("shape", ["--model.hidden_size", "64"]))])
    third = [(case, "train", resume[case]) for case in into_world2] + [
        (f"{case}-state", "save", resume[case]) for case in into_world2]
    records = {}
    for world, jobs in ((2, first), (1, second), (2, third)):
        for rank in run_distributed(_runs, world, data, root, jobs):
            for name, record in rank.items():
                records.setdefault(name, []).append(record)
    return root, records


def _samples(records: list) -> torch.Tensor:
    """The samples a run trained on, in the global order: per micro-step, DP rank 0's micro-batch,
    then DP rank 1's (micro_batches gives rank r the r-th slice of each micro x DP samples)."""
    per_dp = {r["dp"]: r["tokens"] for r in records if r["tp"] == 0 and r["first_stage"]}
    return torch.cat([t for step in zip(*(per_dp[d] for d in sorted(per_dp))) for t in step])


@pytest.mark.parametrize("case", list(CASES))
def test_resharded_resume_continues_as_the_new_layouts_run(runs, case):
    root, records = runs
    source, new, _ = CASES[case]
    reference, resumed = losses(f"{root}/{new}"), losses(f"{root}/{case}")
    assert sorted(reference) == list(range(1, 2 * N + 1)) and sorted(resumed) == list(range(N + 1, 2 * N + 1))
    # Not asserted bitwise: the source's first N steps ran under another layout, which sums matmuls
    # (TP) and gradients (DP) in another order, so its step-N state need not be the reference's to the
    # bit (here it is; the loaded state itself is checked bit for bit below). A reshard that lost or
    # misplaced any value (a moment, the step's bias correction, a slice) moves the loss by far more.
    torch.testing.assert_close(torch.tensor([resumed[s] for s in sorted(resumed)]),
                               torch.tensor([reference[s] for s in sorted(resumed)]), rtol=1e-6, atol=0)
    assert len(set(reference.values())) == 2 * N                    # the steps really differ
    trained = torch.cat([_samples(records[source])[:N * 4], _samples(records[case])])   # (sources run on to 2N)
    expected = _samples(records[new])
    assert trained.shape == expected.shape == (2 * N * 4, 16)       # global batch 4, 16 tokens
    assert torch.equal(trained, expected)                           # no sample repeated, skipped or reordered
    assert len(torch.unique(expected, dim=0)) > N * 4


@pytest.mark.parametrize("case", list(CASES))
def test_resharded_engine_holds_the_checkpoints_state(runs, case):
    """Resumed under the new layout and saved at once, the checkpoint consolidates to the very
    tensors of the source: weights, buffers, fp32 master weights, AdamW moments and step; DeepSpeed's
    step counters come along."""
    from pretrain.checkpoint import load_file, read_meta
    from pretrain.reshard import full_training_state, model_shards

    root, _ = runs

    def state(path):
        meta = read_meta(path)
        names = {n for n, t in model_shards(path, meta)[0].items() if t is not None}
        return meta, full_training_state(path, meta, names)

    (src_meta, (model, optim, rest)), (meta, (model2, optim2, rest2)) = state(_ckpt(root, CASES[case][0])), \
        state(_ckpt(root, f"{case}-state"))
    assert (meta["iteration"], meta["consumed_samples"]) == (src_meta["iteration"], src_meta["consumed_samples"]) == (N, 4 * N)
    assert model.keys() == model2.keys() and optim.keys() == optim2.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
    for name in model:
        assert torch.equal(model[name], model2[name]), name
    for key in optim:
        for name in optim[key]:
            assert torch.equal(optim[key][name], optim2[key][name]), (key, name)
    assert float(rest["step"]) == float(rest2["step"]) == N
    assert any(bool(t.any()) for t in optim["exp_avg"].values())
    counters = load_file(f"{_ckpt(root, f'{case}-state')}/mp_rank_00_model_states.pt")
    assert (counters["global_steps"], counters["global_samples"]) == (N, 4 * N)


def test_layout_change_without_reshard_is_refused(runs):
    """Also under reshard everything else is checked, and ZeRO-0 (no partitions) is refused."""
    root, records = runs
    lines = {"tp2": "tensor-parallel size (parallel.tensor): checkpoint 2, this run 1",
             "pp2": "pipeline-parallel size (parallel.pipeline): checkpoint 2, this run 1",
             "dp2": "data-parallel size (world size / (parallel.tensor x parallel.pipeline)): checkpoint 2, this run 1"}
    for src, line in lines.items():
        assert records[f"{src}-refused"][0]["error"] == (
            f"cannot resume from {_ckpt(root, src)}:\n  {line}\n  (a checkpoint of another parallel layout resumes "
            f"only with --checkpoint.reshard true, which re-splits its model and optimizer state)")
    assert all(r["error"] is None for case in CASES for r in records[case])
    head = f"cannot resume from {_ckpt(root, 'tp2')}:\n  "
    assert records["tp2-zero0"][0]["error"] == head + (
        "checkpoint.reshard re-splits DeepSpeed's ZeRO fp32 partitions and needs ZeRO stage 1 or 2: "
        "parallel.zero_stage checkpoint 1, config 0")
    assert records["tp2-shape"][0]["error"] == head + "model.hidden_size: checkpoint 32, config 64"


def test_reshard_says_once_that_random_streams_start_afresh(runs):
    root, records = runs
    for case, (src, new, _) in CASES.items():
        said = [w for r in records[case] for w in r["warnings"] if "random streams" in w]
        assert said == [f"resharded {_ckpt(root, src)} from {LAYOUTS[src]} to {LAYOUTS[new]}: the random streams "
                        f"(dropout masks) are per rank and cannot continue under another layout; they start afresh "
                        f"from train.seed"], case
