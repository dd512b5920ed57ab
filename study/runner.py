"""Runs a plan: for each run, pretrain up to each evaluation point, then GPTQ + quant.evaluate +
quant.analyze of that checkpoint, all through the project's own command lines, and record the
numbers in ``OUT/arms/<run id>/result.json``.

Training stops at each point (``train.stop_at_step``: save and exit 0) and resumes from that
checkpoint after the evaluation, so a run's evaluations accumulate even when the allocation ends
mid-run, and a relaunch continues where it stopped. A run whose result.json is complete is
skipped; a partial one keeps its recorded points (they may have come from another machine) and
evaluates only the missing ones. Checkpoints and quantized weights stay in ``OUT/work/<id>``;
the report needs only the result files.
"""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from pretrain.checkpoint import latest_checkpoint, read_meta
from pretrain.config import ConfigError
from study import results
from study.plan import Plan, Run

log = logging.getLogger("study")


class RunFailed(RuntimeError):
    """A command of a run exited non-zero; the message ends with its log's tail."""


class Stopped(Exception):
    """A signal asked the study to stop: training saved its checkpoint; a rerun continues."""


def _tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _diff(a, b, prefix: str = "") -> str | None:
    """The first dotted key where two config dicts differ (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if found:
                return found
        return None
    return None if a == b else f"{prefix[:-1]} ({a!r} vs {b!r})"


class Progress:
    """Where every active run is, for the progress lines: stage, step, measured rate."""

    def __init__(self, runs: list[Run], concurrent: int):
        self.lock = threading.Lock()
        self.total = {r.id: r.steps for r in runs}
        self.done_steps = {r.id: 0 for r in runs}
        self.stage = {}
        self.rate = {}                # seconds per step, measured by this process
        self.posttrain_s = []         # seconds of each finished evaluation point
        self.pending_points = {r.id: len(r.points) for r in runs}
        self.concurrent = concurrent
        self.finished = 0
        self.start = time.time()

    def update(self, run_id: str, stage: str, step: int | None = None) -> None:
        with self.lock:
            self.stage[run_id] = stage
            if step is not None:
                self.done_steps[run_id] = step

    def line(self) -> str:
        with self.lock:
            rates = list(self.rate.values())
            s_per_step = sum(rates) / len(rates) if rates else None
            eval_s = sum(self.posttrain_s) / len(self.posttrain_s) if self.posttrain_s else None
            parts = []
            for rid, stage in sorted(self.stage.items()):
                if stage == "done":
                    continue
                left = self.total[rid] - self.done_steps[rid]
                eta = f", ETA {left * self.rate[rid] / 60:.1f} min" if rid in self.rate and stage == "train" else ""
                parts.append(f"{rid}: {stage} {self.done_steps[rid]}/{self.total[rid]}{eta}")
            steps_left = sum(self.total[r] - self.done_steps[r] for r in self.total)
            plan_eta = ""
            if s_per_step is not None:
                secs = steps_left * s_per_step + sum(self.pending_points.values()) * (eval_s or 0.0)
                plan_eta = f" | plan ETA {secs / self.concurrent / 60:.1f} min"
            return (f"[study] {self.finished}/{len(self.total)} runs done, {time.time() - self.start:.0f} s"
                    f"{plan_eta}" + ("\n  " + "\n  ".join(parts) if parts else ""))


class Runner:
    def __init__(self, plan: Plan, out: str, concurrent: int = 1, devices: list[str] | None = None,
                 progress_interval: float = 60.0):
        self.plan, self.out = plan, out
        self.concurrent, self.devices = max(1, concurrent), devices
        self.progress_interval = progress_interval
        self.data_dir = os.path.join(out, "data") if plan.data is not None else None
        self.python = sys.executable
        self.stopping = threading.Event()
        self.training = set()          # training process groups, to forward a stop signal to

    # ---- paths and commands -------------------------------------------------------------------
    def work(self, run: Run) -> str:
        return os.path.join(self.out, "work", run.id)

    def _env(self, slot: int) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.devices:
            n = self.plan.gpus_per_run
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices[(slot * n + i) % len(self.devices)]
                                                   for i in range(n))
        return env

    def _cmd(self, module: str, *args: str, ranks: int = 1) -> list[str]:
        if ranks > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                    "-m", module, *args]
        return [self.python, "-m", module, *args]

    def _call(self, cmd: list[str], logfile: str, env: dict | None = None) -> None:
        os.makedirs(os.path.dirname(logfile), exist_ok=True)
        with open(logfile, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or self._env(0))
        if code != 0:
            raise RunFailed(f"{' '.join(cmd[2:4])} exited {code}; {logfile} ends with:\n{_tail(logfile)}")

    # ---- data -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Tokenizer and token files in OUT/data, made once (kept when present)."""
        d = self.plan.data
        if d is None:
            return
        if not os.path.isdir(d.corpus):
            raise ConfigError(f"data.corpus {d.corpus!r} is not a directory (give --corpus DIR)")
        shards = d.shards or sorted(f for f in os.listdir(d.corpus)
                                    if f != d.valid and f.endswith((".jsonl", ".jsonl.xz", ".jsonl.gz")))
        paths = [os.path.join(d.corpus, s) for s in shards]
        missing = [p for p in paths + [os.path.join(d.corpus, d.valid)] if not os.path.isfile(p)]
        if missing or not shards:
            raise ConfigError(f"data: {missing[0] if missing else 'no training shards'} in {d.corpus}")
        out, logfile = self.data_dir, os.path.join(self.data_dir, "prepare.log")
        os.makedirs(out, exist_ok=True)
        tok = os.path.join(out, "tokenizer")
        if not os.path.isfile(tok + ".model"):
            log.info(f"[study] training the tokenizer on {len(paths)} shards of {d.corpus}")
            self._call(self._cmd("data_prep.train_tokenizer", "--input", *paths, "--vocab-size", str(d.vocab_size),
                                 "--model-type", d.model_type, "--output", tok,
                                 "--max-sentences", str(d.max_sentences)), logfile)
        for prefix, inputs in (("train", paths), ("valid", [os.path.join(d.corpus, d.valid)])):
            if not os.path.isfile(os.path.join(out, prefix + ".idx")):
                log.info(f"[study] tokenizing {prefix}")
                self._call(self._cmd("data_prep.tokenize", "--input", *inputs, "--tokenizer", tok + ".model",
                                     "--output-prefix", os.path.join(out, prefix), "--workers", str(d.workers),
                                     "--append-eod"), logfile)

    # ---- one run --------------------------------------------------------------------------------
    def _checked_config(self, run: Run) -> dict:
        """The run's config as a dict, written to work/<id>/config.yaml; refuses a work dir or
        result made with another config (a changed plan must not mix with old numbers)."""
        cfg = dataclasses.asdict(self.plan.run_config(run, self.work(run), self.data_dir))
        path = os.path.join(self.work(run), "config.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                old = yaml.safe_load(f)
            where = _diff(old, cfg)
            if where:
                raise ConfigError(f"{self.work(run)} holds a run of another config (first difference: {where}); "
                                  f"move it away or rename the arm")
        os.makedirs(self.work(run), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        return cfg

    def run(self, run: Run, slot: int, progress: Progress) -> dict:
        """Train and evaluate one run; returns its (complete) result."""
        env = self._env(slot)
        cfg = self._checked_config(run)
        result = results.read(self.out, run.id)
        if result is not None:
            where = _diff(results.comparable(result["config"]), results.comparable(cfg))
            if where:
                raise ConfigError(f"arms/{run.id}/result.json was made with another config (first difference: "
                                  f"{where}); move it away or rename the arm")
        else:
            result = results.new(run, cfg, self.plan)
        work, logs = self.work(run), os.path.join(self.work(run), "logs")
        train_cmd = ["--config", os.path.join(work, "config.yaml")]
        failures = []
        for point in run.points:
            if results.has_point(result, point, self.plan.specs_for(run, point)):
                progress.update(run.id, "train", point)
                with progress.lock:
                    progress.pending_points[run.id] -= 1
                continue
            step_dir = latest_checkpoint(os.path.join(work, "checkpoints"))
            at = read_meta(step_dir)["iteration"] if step_dir else 0
            if at > point:
                continue                     # reported as missing below
            if self.stopping.is_set():
                raise Stopped
            if at < point:
                progress.update(run.id, "train", at)
                t0 = time.time()
                stop = [] if point == run.steps else ["--train.stop_at_step", str(point)]
                self._train(run, train_cmd + stop, os.path.join(logs, "train.log"), env, progress, point)
                result["seconds"]["train"] += time.time() - t0
                with progress.lock:
                    progress.rate[run.id] = (time.time() - t0) / max(1, point - at)
                step_dir = latest_checkpoint(os.path.join(work, "checkpoints"))
                at = read_meta(step_dir)["iteration"]
                if at != point:            # pretrain.train saved early and exited 0: it got a signal
                    raise Stopped
            progress.update(run.id, "posttrain", point)
            t0 = time.time()
            try:
                self._posttrain(run, point, step_dir, env, logs, result)
            except RunFailed as e:               # training goes on to the next points
                failures.append(f"step {point}: {e}")
            result["seconds"]["posttrain"] += time.time() - t0
            with progress.lock:
                progress.posttrain_s.append(time.time() - t0)
                progress.pending_points[run.id] -= 1
        result["curve"] = results.read_curve(work)
        missing = [p for p in run.points if not results.has_point(result, p, self.plan.specs_for(run, p))]
        result["complete"] = not missing
        results.write(self.out, result)
        if failures:
            raise RunFailed(f"{run.id}: " + "\n".join(failures))
        if missing:
            raise RunFailed(f"{run.id}: points {missing} are not evaluated and their checkpoints are gone; "
                            f"remove {work} to train the run again")
        progress.update(run.id, "done", run.steps)
        return result

    def _train(self, run: Run, args: list[str], logfile: str, env: dict, progress: Progress, point: int) -> None:
        """pretrain.train until ``point``, reporting the step from metrics.jsonl as it goes."""
        metrics = os.path.join(self.work(run), "metrics.jsonl")
        os.makedirs(os.path.dirname(logfile), exist_ok=True)
        cmd = self._cmd("pretrain.train", *args, ranks=self.plan.gpus_per_run)
        with open(logfile, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.training.add(proc.pid)
            try:
                while proc.poll() is None:
                    time.sleep(2)
                    step = results.last_step(metrics)
                    if step is not None:
                        progress.update(run.id, "train", min(step, point))
            finally:
                self.training.discard(proc.pid)
        if proc.returncode != 0:
            raise RunFailed(f"{run.id}: pretrain.train exited {proc.returncode}; {logfile} ends with:\n{_tail(logfile)}")

    def _posttrain(self, run: Run, point: int, step_dir: str, env: dict, logs: str, result: dict) -> None:
        """GPTQ + evaluate for each spec and the analysis of the checkpoint at ``point``: the plan's
        first spec, then the analysis, then the other specs (what an allocation cut short keeps
        first). Each finished piece goes into result.json at once, pieces already there are not
        redone, and a failed piece does not stop the others (the failures are raised together)."""
        ev, here = self.plan.evaluation, os.path.join(self.work(run), f"point{point:08d}")
        current = results.point(result, point) or {"step": point, "eval": {}, "eval_files": {}}

        def record():
            results.add_point(result, current, results.read_curve(self.work(run)))
            results.write(self.out, result)

        def quantize_and_evaluate(spec):
            qdir = os.path.join(here, spec.name)
            gptq = ["--checkpoint", step_dir, "--output", qdir, "--method", spec.method, "--bits", str(spec.bits),
                    "--group-size", str(spec.group_size), "--nsamples", str(spec.nsamples),
                    "--batch-size", str(ev.batch_size)] + (["--act-order"] if spec.act_order else [])
            self._call(self._cmd("quant.quantize", *gptq), os.path.join(logs, f"gptq-{spec.name}.log"), env)
            out = os.path.join(qdir, "eval.json")
            evaluate = ["--checkpoint", step_dir, "--quantized", qdir, "--configs", *spec.configs,
                        "--tasks", *ev.tasks, "--batch-size", str(ev.batch_size), "--output", out]
            evaluate += ["--ppl-windows", str(ev.ppl_windows)] if ev.ppl_windows else []
            evaluate += ["--limit", str(ev.task_limit)] if ev.task_limit else []
            self._call(self._cmd("quant.evaluate", *evaluate), os.path.join(logs, f"evaluate-{spec.name}.log"), env)
            with open(out) as f:
                current["eval"][spec.name] = json.load(f)
            current["eval_files"][spec.name] = os.path.relpath(out, self.out)

        def analyze():
            adir = os.path.join(here, "analysis")
            self._call(self._cmd("quant.analyze", "--checkpoint", step_dir, "--output", adir,
                                 "--nsamples", str(ev.analyze_nsamples), "--batch-size", str(ev.batch_size)),
                       os.path.join(logs, "analyze.log"), env)
            with open(os.path.join(adir, "analysis.json")) as f:
                current["analysis"] = results.analysis_summary(next(iter(json.load(f).values())))

        planned = self.plan.specs_for(run, point)
        specs = [s for s in planned if not results.spec_done(current, s)]
        pieces = [lambda s=s: quantize_and_evaluate(s) for s in specs]
        if "analysis" not in current:
            pieces.insert(1 if specs and specs[0] is planned[0] else 0, analyze)
        failures = []
        for piece in pieces:
            try:
                piece()
            except RunFailed as e:
                failures.append(str(e))
                continue
            record()
        if failures:
            raise RunFailed("\n".join(failures))

    # ---- the plan -------------------------------------------------------------------------------
    def finished(self, run: Run) -> bool:
        """Every point of the run is evaluated as the plan asks now (not the stored flag: a
        plan may have gained a spec or configuration since)."""
        r = results.read(self.out, run.id)
        return r is not None and all(results.has_point(r, p, self.plan.specs_for(run, p)) for p in run.points)

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 (SLURM's warning): training processes save and exit (pretrain.train
        handles both), evaluations in flight finish, nothing new starts."""
        log.warning(f"[study] signal {signum}: stopping after the training processes have saved")
        self.stopping.set()
        for pid in list(self.training):
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                pass

    def run_all(self, runs: list[Run]) -> tuple[list[str], list[str]]:
        """Every run, ``concurrent`` at a time; returns the ids of the runs that failed and of
        those a signal stopped."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.prepare_data()
        todo = [r for r in runs if not self.finished(r)]
        for r in runs:
            if r not in todo:
                log.info(f"[study] {r.id}: complete, skipped")
        progress = Progress(todo, min(self.concurrent, max(1, len(todo))))
        failed, stopped, stop = [], [], threading.Event()

        def monitor():
            while not stop.wait(self.progress_interval):
                log.info(progress.line())

        slots = list(range(self.concurrent))
        slot_lock = threading.Lock()

        def one(run: Run):
            with slot_lock:
                slot = slots.pop(0)
            try:
                log.info(f"[study] {run.id}: start ({run.steps} steps, points {list(run.points)})")
                self.run(run, slot, progress)
                log.info(f"[study] {run.id}: done")
            except Stopped:
                log.warning(f"[study] {run.id}: stopped (checkpoint saved; a rerun continues it)")
                stopped.append(run.id)
                progress.update(run.id, "done")
            except (RunFailed, ConfigError, OSError) as e:
                log.error(f"[study] {run.id} failed: {e}")
                failed.append(run.id)
                progress.update(run.id, "done")
            finally:
                with progress.lock:
                    progress.finished += 1
                with slot_lock:
                    slots.append(slot)

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        with ThreadPoolExecutor(self.concurrent) as pool:
            list(pool.map(one, todo))
        stop.set()
        log.info(progress.line())
        return failed, stopped
