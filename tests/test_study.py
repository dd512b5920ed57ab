"""The study runner and report: plans are checked before any work; a two-arm plan of the tiny
config runs end to end through the command lines (train, GPTQ, evaluate, analyze at two points);
a rerun skips finished runs and redoes only what is missing; two result directories merge into one
report whose numbers are the arms' own quant.evaluate JSONs."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from pretrain.config import ConfigError
from study import report, results
from study.plan import load_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "study", "tiny.yaml")


def plan_file(tmp_path, **changes) -> str:
    with open(TINY) as f:
        raw = yaml.safe_load(f)
    raw.update(changes)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_runs_points_lengths_and_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = load_plan(plan_file(tmp_path, lengths=[4, 6], warmup_fraction=0.25, qat_start_fraction=0.5,
                               fractions=[0.25, 0.5]))
    runs = {r.id: r for r in plan.runs()}
    assert list(runs) == ["baseline-seed1234", "baseline-seed1234-steps4", "baseline-seed1234-steps6",
                          "qat-kurt-seed1234", "qat-kurt-seed1234-steps4", "qat-kurt-seed1234-steps6"]
    assert runs["baseline-seed1234"].points == (2, 4, 8)            # the fractions and always the end
    assert runs["qat-kurt-seed1234-steps6"].points == (6,)
    raw = yaml.safe_load(open(TINY))
    raw["arms"][1]["fractions"] = [1.0]                             # an arm evaluated at its end only
    only_end = {r.id: r for r in load_plan(plan_file(tmp_path, arms=raw["arms"], fractions=[0.25, 0.5])).runs()}
    assert only_end["qat-kurt-seed1234"].points == (8,) and only_end["baseline-seed1234"].points == (2, 4, 8)
    cfg = plan.run_config(runs["qat-kurt-seed1234-steps4"], "out/x", "out/data")
    assert (cfg.train.steps, cfg.optim.warmup_steps, cfg.qat.start_step) == (4, 1, 2)
    assert cfg.qat.enabled and cfg.kurtosis.enabled and cfg.model.num_layers == 2
    assert cfg.data.paths == ["out/data/train"] and cfg.model.vocab_size == 1024
    assert cfg.data.cache_dir == "out/x/index-cache"
    base = plan.run_config(runs["baseline-seed1234"], "out/b", "out/data")
    assert not base.qat.enabled and not base.kurtosis.enabled and base.train.steps == 8


@pytest.mark.parametrize("changes, message", [
    ({"arms": [{"name": "baseline", "overrides": {"qat.enabeld": False}}]},
     r"^arm baseline: unknown config key qat.'enabeld' \(did you mean qat.enabled\?\); known keys of qat: bits, "
     r"enabled, init, init_value, layers, recompute_inputs, start_step$"),
    ({"arms": [{"name": "baseline", "overide": {}}]},
     r"^unknown config key arms\[0\].'overide' \(did you mean arms\[0\].overrides\?\); known keys of arms\[0\]: "
     r"fractions, lengths, name, overrides, seeds$"),
    ({"arms": [{"overrides": {}}]}, r"arms\[0\]: missing required key 'name'"),
    ({"base": "configs/nope.yaml"}, r"base config 'configs/nope.yaml' not found"),
    ({"baseline": "nope"}, r"baseline arm 'nope' is not among the arms \(baseline, qat-kurt\)"),
    ({"fractions": [0.5, 1.5]}, r"fractions must lie in \(0, 1\]"),
    ({"arms": [{"name": "baseline", "fractions": [0]}]}, r"^arm baseline: fractions must lie in \(0, 1\], got \[0\.0\]$"),
    ({"posttrain": [{"name": "w", "configs": ["W5A4"]}]}, r"posttrain w: 'W5A4' is not a configuration name"),
    ({"posttrain": [{"name": "w", "method": "magic"}]}, r"posttrain w: method must be one of"),
    ({"posttrain": [{"name": "w", "arms": ["qat"]}]}, r"posttrain w: unknown arm 'qat'"),
    ({"arms": [{"name": "a-seed1"}, {"name": "baseline"}]}, r"arm name 'a-seed1'"),
    ({"arms": [{"name": "baseline"}, {"name": "baseline"}]}, r"arm 'baseline' appears twice"),
])
def test_bad_plans_are_refused_before_any_work(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=message):
        load_plan(plan_file(tmp_path, **changes))


def cli(*args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def test_cli_refuses_unknown_arm_and_index(tmp_path, monkeypatch, capsys):
    """The refusals by study.__main__.main in this process (what ``python -m study`` exits with);
    the listing through the real entry point, whose stdout must be the run ids alone."""
    from study.__main__ import main

    def study(*args):
        code = main(["--plan", TINY, *args])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    monkeypatch.chdir(REPO)
    code, out = study("--arms", "qat", "--out", str(tmp_path))
    assert code == 2 and "plan error: --arms: no arm 'qat' in" in out and "(arms: baseline, qat-kurt)" in out
    code, out = study("--index", "5", "--list")
    assert code == 2 and "--index 5: the selection has 2 runs (0..1)" in out
    listed = subprocess.run([sys.executable, "-m", "study", "--plan", TINY, "--list", "--seeds", "1234"], cwd=REPO,
                            capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.splitlines() == ["baseline-seed1234", "qat-kurt-seed1234"]
    code, out = study("--list", "--runs", "qat-kurt-seed1234")
    assert code == 0 and out.splitlines()[0] == "qat-kurt-seed1234"
    code, out = study("--list", "--runs", "qat-kurt-seed2")
    assert code == 2 and "plan error: --runs: no run 'qat-kurt-seed2' in the selection of" in out


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """The tiny plan's tokenizer and token files, prepared once by the runner; each study below
    starts from a copy in its OUT/data, which the runner keeps (as on a relaunch)."""
    from study.runner import Runner

    out = tmp_path_factory.mktemp("study-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        Runner(load_plan(TINY), str(out)).prepare_data()
    return out / "data"


def with_data(study_dir, study_data) -> str:
    shutil.copytree(study_data, os.path.join(study_dir, "data"))
    return str(study_dir)


@pytest.fixture(scope="module")
def studies(tmp_path_factory, study_data):
    """The tiny plan's two arms run into two study directories (as on two machines)."""
    root = tmp_path_factory.mktemp("study")
    dirs = {}
    for arm in ("baseline", "qat-kurt"):
        dirs[arm] = with_data(root / arm, study_data)
        code, out = cli("study", "--plan", TINY, "--out", dirs[arm], "--arms", arm, "--progress-interval", "5")
        assert code == 0, out[-4000:]
    return dirs


def eval_values(study_dir: str, run_id: str) -> dict:
    """{step: {spec: {config: {metric: value}}}} straight from the run's quant.evaluate JSONs."""
    found = {}
    for p in results.read(study_dir, run_id)["points"]:
        for spec, rel in p["eval_files"].items():
            with open(os.path.join(study_dir, rel)) as f:
                table = json.load(f)["table"]
            found.setdefault(p["step"], {})[spec] = {c: {m: v["value"] for m, v in cells.items()}
                                                     for c, cells in table.items()}
    return found


@pytest.mark.slow
def test_two_arm_plan_end_to_end(studies):
    for arm, d in studies.items():
        r = results.read(d, f"{arm}-seed1234")
        assert r["complete"] and [p["step"] for p in r["points"]] == [4, 8]
        assert r["config"]["qat"]["enabled"] == (arm == "qat-kurt")
        for p in r["points"]:
            assert list(p["eval"]["gptq-w4g32"]["table"]) == ["W16A16", "W8A8", "W4A16", "W4A4"]
            assert p["valid_loss"] is not None and p["tokens"] == p["step"] * 16 * 64
            assert len(p["analysis"]["linears"]) == 8 and p["analysis"]["mean_output_kurtosis_residual"] > 0
        steps = [c["step"] for c in r["curve"] if "train/loss" in c]
        assert steps == [2, 4, 6, 8]                          # one record per step across both segments
        for name in ("report.md", "summary.json", "cliff.png", "outliers.png", "kurtosis.png"):
            assert os.path.getsize(os.path.join(d, name)) > 0


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_only_missing_pieces(studies):
    d = studies["baseline"]
    path = results.path(d, "baseline-seed1234")
    before = open(path).read()
    code, out = cli("study", "--plan", TINY, "--out", d, "--arms", "baseline")
    assert code == 0 and "baseline-seed1234: complete, skipped" in out
    assert open(path).read() == before
    # As if the allocation had ended during the final point's analysis: only that is redone.
    r = json.loads(before)
    del r["points"][-1]["analysis"]
    r["complete"] = False
    results.write(d, r)
    logs = os.path.join(d, "work", "baseline-seed1234", "logs")
    sizes = {f: os.path.getsize(os.path.join(logs, f)) for f in os.listdir(logs)}
    code, out = cli("study", "--plan", TINY, "--out", d, "--arms", "baseline")
    assert code == 0, out[-3000:]
    grown = {f for f in os.listdir(logs) if os.path.getsize(os.path.join(logs, f)) != sizes[f]}
    assert grown == {"analyze.log"}
    again = results.read(d, "baseline-seed1234")
    assert again["complete"] and again["points"][-1]["analysis"] == json.loads(before)["points"][-1]["analysis"]


@pytest.mark.slow
def test_merged_report_holds_both_arms_with_the_eval_json_numbers(studies, tmp_path):
    out = str(tmp_path / "merged")
    code, text = cli("study.report", studies["baseline"], studies["qat-kurt"], "--output", out)
    assert code == 0, text
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["runs"]) == {"baseline-seed1234", "qat-kurt-seed1234"}
    for arm, d in studies.items():
        run_id = f"{arm}-seed1234"
        want = eval_values(d, run_id)
        got = {p["step"]: p["eval"] for p in summary["runs"][run_id]["points"]}
        assert got == want
        assert results.read(out, run_id) == results.read(d, run_id)      # merged copies written
    md = open(os.path.join(out, "report.md")).read()
    # The headline cell: the QAT arm's final W4A4 against the baseline's W16A16, as the JSONs give it.
    base = eval_values(studies["baseline"], "baseline-seed1234")[8]["gptq-w4g32"]["W16A16"]["wikitext2_ppl"]
    qat = eval_values(studies["qat-kurt"], "qat-kurt-seed1234")[8]["gptq-w4g32"]["W4A4"]["wikitext2_ppl"]
    row = next(line for line in md.splitlines() if line.startswith("| qat-kurt (QAT) |"))
    assert f"**{100 * (qat / base - 1):+.1f} %**" in row
    assert "† quantizers off, not a deployment configuration: a QAT model's A16 configurations" in md and " †" in row


def test_the_curve_keeps_the_last_record_of_each_step_without_per_layer_values(tmp_path):
    layers = {"qat/blocks.0.attn.qkv/c_lo": -1.0, "kurtosis/blocks.0.mlp.fc2": 3.0}
    records = [{"step": 2, "train/loss": 3.0, "layers": layers}, {"step": 2, "valid/loss": 2.5},
               {"step": 2, "train/loss": 2.9, "layers": layers}, {"step": 1, "train/loss": 4.0, "layers": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))   # resumed: step 2 twice
    assert results.read_curve(str(tmp_path)) == [{"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 2.9},
                                                 {"step": 2, "valid/loss": 2.5}]


def test_merge_unions_points_and_refuses_other_configs(tmp_path):
    def result(points, complete, lr=1e-3):
        return {"id": "a-seed1", "arm": "a", "seed": 1, "steps": 8, "complete": complete, "curve": [{"step": 2}] * len(points),
                "config": {"optim": {"lr": lr}, "train": {"out_dir": str(tmp_path)}},
                "points": [{"step": s, "eval": {}} for s in points]}
    results.write(str(tmp_path / "x"), result([4], False))
    results.write(str(tmp_path / "y"), result([4, 8], True))
    merged = results.merge([str(tmp_path / "x"), str(tmp_path / "y")])
    assert [p["step"] for p in merged["a-seed1"]["points"]] == [4, 8] and merged["a-seed1"]["complete"]
    results.write(str(tmp_path / "z"), result([4], False, lr=2e-3))
    with pytest.raises(ConfigError, match="a-seed1: the copies in .* were trained with different configs"):
        results.merge([str(tmp_path / "x"), str(tmp_path / "z")])
    assert report.change(110.0, 100.0) == pytest.approx(10.0)


@pytest.mark.slow
def test_slurm_array_task_preempted_then_requeued_completes(tmp_path, study_data):
    """launch/slurm/study.sbatch as task 0 of an array: the warning signal makes the training save,
    the task exit 0 and requeue itself; the requeued task continues the run to its end."""
    from tests.data_utils import ENV, finish
    from tests.test_faults import _wait_for_steps
    from tests.test_launch import FAKE_SCONTROL

    with open(TINY) as f:
        raw = yaml.safe_load(f)
    raw["overrides"]["train"].update(steps=40, eval_interval=0)
    raw["fractions"] = [1.0]
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(raw))
    bin_dir, log_file, out = tmp_path / "bin", tmp_path / "slurm.log", tmp_path / "study"
    with_data(out, study_data)
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log_file),
           "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "0"}

    def task():
        return subprocess.Popen(["bash", "launch/slurm/study.sbatch", str(plan), str(out), "--progress-interval", "5"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    work = out / "work" / "baseline-seed1234"
    proc = task()
    _wait_for_steps(work, 1, proc, timeout=240)
    proc.send_signal(signal.SIGUSR1)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    assert "baseline-seed1234: stopped (checkpoint saved; a rerun continues it)" in log
    assert log_file.read_text().splitlines() == ["scontrol requeue 77_0"]
    saved = results_step(work)
    assert 0 < saved < 40 and results.read(str(out), "baseline-seed1234") is None
    code, log = finish(task())
    assert code == 0, log[-3000:]
    r = results.read(str(out), "baseline-seed1234")
    assert r["complete"] and [p["step"] for p in r["points"]] == [40]
    logged = [json.loads(line)["step"] for line in open(work / "metrics.jsonl") if "train/loss" in line]
    assert logged == list(range(2, 41, 2))                              # no step trained twice
    assert f"starting at step {saved}" in open(work / "logs" / "train.log").read()
    assert log_file.read_text().splitlines() == ["scontrol requeue 77_0"]   # not requeued again


def results_step(work) -> int:
    from pretrain.checkpoint import latest_checkpoint, read_meta
    return read_meta(latest_checkpoint(os.path.join(work, "checkpoints")))["iteration"]


@pytest.mark.parametrize("plan", sorted(os.listdir(os.path.join(REPO, "configs", "study"))))
def test_committed_plans_load(plan, monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_plan(os.path.join("configs", "study", plan)).runs()


def test_concurrent_runs_get_their_own_devices(monkeypatch):
    from study.runner import Runner
    monkeypatch.chdir(REPO)
    plan = load_plan(TINY)
    runner = Runner(plan, "out", concurrent=4, devices=["0", "1"])
    assert [runner._env(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["0", "1", "0", "1"]
    plan.gpus_per_run = 2
    runner = Runner(plan, "out", concurrent=2, devices=["0", "1", "2", "3"])
    assert [runner._env(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(2)] == ["0,1", "2,3"]
    assert runner._cmd("pretrain.train", "--x", ranks=2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                                "--nproc-per-node", "2"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in Runner(plan, "out")._env(0)     # no --devices: what is visible


def test_headline_of_a_spec_the_baseline_does_not_run_uses_its_w16a16():
    """A QAT arm's W16A4 (spec as-trained, QAT arms only) is measured against the baseline's W16A16
    of another spec (16-bit weights are the same under every spec), same seed first."""
    from study.report import headline

    def run(arm, seed, ev):
        return {"arm": arm, "seed": seed, "steps": 8, "points": [{"step": 8, "eval": ev}]}
    summary = {"baseline": "baseline", "runs": {
        "baseline-seed1": run("baseline", 1, {"gptq": {"W16A16": {"wikitext2_ppl": 10.0}}}),
        "baseline-seed2": run("baseline", 2, {"gptq": {"W16A16": {"wikitext2_ppl": 20.0}}}),
    }}
    qat = run("qat", 2, {"as-trained": {"W16A4": {"wikitext2_ppl": 22.0}}})
    assert headline(summary, qat, 8, "as-trained", "wikitext2_ppl", "W16A4") == pytest.approx(10.0)
    qat["seed"] = 3                                               # no baseline of seed 3: their mean, 15
    assert headline(summary, qat, 8, "as-trained", "wikitext2_ppl", "W16A4") == pytest.approx(100 * (22 / 15 - 1))


def test_summary_lists_the_specs_of_every_run():
    """Runs made before a spec joined the plan lack it; the merged report still has its table."""
    from study.report import summarize

    def run(specs):
        return {"arm": "a", "seed": 1, "steps": 8, "config": {"qat": {"enabled": False}, "kurtosis": {"enabled": False}},
                "posttrain": [{"name": s} for s in specs], "points": []}
    summary = summarize({"a-seed1": run(["gptq", "w3"]), "a-seed2": run(["gptq", "as-trained", "w3"])})
    assert summary["specs"] == ["gptq", "w3", "as-trained"]


@pytest.mark.slow
def test_a_failed_piece_keeps_the_others_and_training_goes_on(tmp_path, monkeypatch, study_data):
    """A post-training command that fails (AdaDim's broadcast did, on the GPU) costs only its own
    cells: the analysis and the other specs of that point, and the later points, are still made."""
    from study.runner import Runner, RunFailed

    monkeypatch.chdir(REPO)
    spec = {"name": "gptq-w4g32", "method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "nsamples": 4}
    plan = load_plan(plan_file(tmp_path, posttrain=[{**spec, "name": "rtn-w4", "method": "rtn", "act_order": False},
                                                    spec]))
    call = Runner._call

    def failing(self, cmd, logfile, env=None):
        if "rtn" in cmd:
            raise RunFailed("quant.quantize --checkpoint exited 1; planted")
        return call(self, cmd, logfile, env)
    monkeypatch.setattr(Runner, "_call", failing)
    run = next(r for r in plan.runs() if r.arm == "baseline")
    failed, stopped = Runner(plan, with_data(tmp_path / "study", study_data), progress_interval=5).run_all([run])
    assert failed == [run.id] and not stopped
    r = results.read(str(tmp_path / "study"), run.id)
    assert not r["complete"] and [p["step"] for p in r["points"]] == [4, 8]
    for p in r["points"]:
        assert list(p["eval"]) == ["gptq-w4g32"] and p["analysis"]["mean_kurtosis"] > 0
