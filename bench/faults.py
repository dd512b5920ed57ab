"""Fault benchmark: the tiny 2-rank CPU run (pretrain.tiny_run's model and data, gloo, torchrun) killed
N times with SIGKILL and N times with SIGTERM, in a random order at random moments, and relaunched with
``--resume auto`` after each; at the end its final weights are compared bit for bit with those of an
uninterrupted run of the same config.

    python bench/faults.py [--n 20] [--seed 0] [--out runs/bench_faults/faults.json]

SIGKILL goes to torchrun and every process under it at once, as when a node dies: the tree is read
first, since torchrun starts its workers in sessions of their own (a process-group kill misses them)
and they are reparented once torchrun is gone. SIGTERM goes to every process under torchrun, as a
preemption signal reaches the workers (launch/torchrun.sh): they finish the step, save and exit 0, and
so does torchrun. Each kill comes at a random moment (0-0.2 s, saves included) after a random step 1
to 2 x the checkpoint interval beyond the furthest step reached so far.

Reported: kills; relaunches that resumed from a checkpoint, kills after which one existed, and
relaunches that took the newest complete one (or started afresh with none); steps lost per kill (the
last step the killed launch logged minus the step its relaunch resumed from), max and mean per signal;
kills that tore a save (the step's directory without COMPLETE); SIGTERMs that saved the step they
stopped at and exited 0; whether the final weights and optimizer shards equal the reference's bit for
bit; wall times. Runs and launch logs go to --work (replaced), the JSON to --out.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil     # a deepspeed dependency
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.checkpoint import is_complete, latest_checkpoint, load_file  # noqa: E402
from pretrain.tiny_run import ENV, ROOT, build_data, train_args  # noqa: E402

INTERVAL = 4                  # checkpoint every INTERVAL steps
STEPS_PER_KILL = 4 * INTERVAL  # train.steps per kill: room for every kill's random step and moment
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


class Launch:
    """One torchrun of the run in ``out_dir``, its output in ``log``; follows the steps it logs."""

    def __init__(self, out_dir: str, args: list[str], log: str):
        self.out_dir, self.log = out_dir, log
        self.metrics = os.path.join(out_dir, "metrics.jsonl")
        self.offset = os.path.getsize(self.metrics) if os.path.exists(self.metrics) else 0   # earlier launches' lines
        self.tree: list[psutil.Process] = []
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc-per-node", "2", "-m", "pretrain.train", *args],
                                         cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)

    def __enter__(self):
        return self

    def __exit__(self, *error) -> None:
        if self.proc.poll() is None:     # the benchmark failed while this launch ran: leave nothing running
            self.kill(signal.SIGKILL)
            self.wait()

    def last_step(self) -> int:
        """The newest step this launch has logged in metrics.jsonl (0: none yet); a line still
        being written is not read."""
        if not os.path.exists(self.metrics):
            return 0
        with open(self.metrics) as f:
            f.seek(self.offset)
            lines = f.read().split("\n")[:-1]
        return max((json.loads(line)["step"] for line in lines), default=0)

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.last_step() < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.log}: no step {step} (exit code {self.proc.poll()}):\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.02)

    def resumed_from(self) -> int | None:
        """The step this launch resumed from (None: it started afresh); known once it trains."""
        found = RESUMED.search(self.output())
        return int(found.group(1)) if found else None

    def kill(self, sig: signal.Signals) -> None:
        """SIGKILL: torchrun and every process under it; other signals: the processes under it."""
        launcher = psutil.Process(self.proc.pid)
        self.tree = launcher.children(recursive=True)
        for p in [launcher, *self.tree] if sig == signal.SIGKILL else self.tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait(self, timeout: float = 600) -> int:
        """torchrun's exit code, once it and every process it had at the kill are gone (once torchrun
        has exited its workers have too, or were killed with it: one left seconds later survived)."""
        code = self.proc.wait(timeout)
        _, alive = psutil.wait_procs(self.tree, timeout=5)
        if alive:
            raise RuntimeError(f"{self.log}: processes {[p.pid for p in alive]} outlived the kill")
        return code


def newest_checkpoint_step(out_dir: str) -> int | None:
    path = latest_checkpoint(os.path.join(out_dir, "checkpoints"))
    return int(os.path.basename(path).removeprefix("step")) if path else None


def run_args(data: str, out_dir: str, steps: int) -> list[str]:
    """The config of both runs, the interrupted one's launches and the reference. The learning rate is
    lowered: at the tiny config's 3e-3 a QAT clip pair crosses near step 145 of 656 and the run aborts
    on its non-finite losses."""
    return train_args(data, out_dir, "--train.steps", str(steps), "--checkpoint.interval", str(INTERVAL),
                      "--optim.lr", "1e-4", "--optim.min_lr", "1e-5", "--resume", "auto")


def _record(launch: Launch, name: str, target: int, code: int) -> dict:
    """What one kill did, as far as the killed launch shows it."""
    at_kill = launch.last_step()
    newest = newest_checkpoint_step(launch.out_dir)
    saving = os.path.join(launch.out_dir, "checkpoints", f"step{at_kill:08d}")   # a save follows its step's log line
    record = {"signal": name, "target_step": target, "at_kill": at_kill, "exit_code": code,
              "newest_checkpoint": newest, "torn_save": os.path.isdir(saving) and not is_complete(saving)}
    if name == "SIGTERM":
        record["saved_and_exited_0"] = (code == 0 and newest == at_kill
                                        and f"stopped at step {at_kill} (signal)" in launch.output())
    return record


def run_with_faults(data: str, out_dir: str, steps: int, signals: list[str], rng: random.Random,
                    progress=print) -> list[dict]:
    """Train ``steps`` steps in ``out_dir``, killed with each of ``signals`` in turn and relaunched
    with --resume auto; the last launch runs to the end (exit 0). Returns one record per kill."""
    args = run_args(data, out_dir, steps)
    kills, furthest = [], 0
    for i, name in enumerate([*signals, None]):
        t0 = time.monotonic()
        with Launch(out_dir, args, os.path.join(out_dir, f"launch{i:02d}.log")) as launch:
            if name is None:
                if launch.wait() != 0:
                    raise RuntimeError(f"the final launch failed:\n{launch.output()[-3000:]}")
            else:
                target = furthest + rng.randint(1, 2 * INTERVAL)
                if target >= steps:
                    raise RuntimeError(f"kill {i + 1} would come at step {target} of {steps}")
                launch.wait_for_step(target)
                time.sleep(rng.uniform(0, 0.2))
                launch.kill(SIGNALS[name])
                code = launch.wait()
        if kills:   # this launch's resume completes the previous kill's record
            last = kills[-1]
            last["resumed_from"] = launch.resumed_from()
            last["steps_lost"] = last["at_kill"] - (last["resumed_from"] or 0)
            progress(f"[{i}/{len(signals)}] {last['signal']} at step {last['at_kill']}"
                     f"{' (mid-save)' if last['torn_save'] else ''}, exit code {last['exit_code']}; "
                     f"the relaunch resumed from step {last['resumed_from']} ({last['steps_lost']} lost)")
        if name is not None:
            kills.append(_record(launch, name, target, code))
            furthest = max(furthest, kills[-1]["at_kill"])
        progress(f"  launch {i}: {time.monotonic() - t0:.1f} s")
    return kills


def _tensors(obj, path: str = ""):
    """Every tensor in a loaded checkpoint file, by where it sits in its containers."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def bitwise_equal(a, b) -> bool:
    """Whether two loaded files hold the same tensors at the same places, bit for bit."""
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    return ta.keys() == tb.keys() and all(x.dtype == tb[k].dtype and x.shape == tb[k].shape
                                          and torch.equal(bits(x), bits(tb[k])) for k, x in ta.items())


def compare_checkpoints(a: str, b: str) -> dict:
    """Two checkpoints' weights (the model file's module) and every rank's optimizer shard (fp32
    master weights, Adam moments), each equal bit for bit or not."""
    model = "mp_rank_00_model_states.pt"
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(a, "*optim_states.pt")))
    load = lambda d, name: load_file(os.path.join(d, name))  # noqa: E731
    return {"weights": bitwise_equal(load(a, model)["module"], load(b, model)["module"]),
            "optimizer": bool(shards) and all(bitwise_equal(load(a, n), load(b, n)) for n in shards)}


def summarize(kills: list[dict]) -> dict:
    out = {"kills": len(kills), "kills_with_a_checkpoint": sum(k["newest_checkpoint"] is not None for k in kills),
           "resumed": sum(k["resumed_from"] is not None for k in kills),
           "relaunched_from_the_newest": sum(k["resumed_from"] == k["newest_checkpoint"] for k in kills)}
    for name in SIGNALS:
        mine = [k for k in kills if k["signal"] == name]
        lost = [k["steps_lost"] for k in mine]
        out[name] = {"kills": len(mine), "steps_lost_max": max(lost, default=0),
                     "steps_lost_mean": round(sum(lost) / len(lost), 2) if lost else 0,
                     "torn_saves": sum(k["torn_save"] for k in mine)}
    out["SIGTERM"]["saved_and_exited_0"] = sum(k["saved_and_exited_0"] for k in kills if k["signal"] == "SIGTERM")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="SIGKILLs, and as many SIGTERMs (default 20)")
    p.add_argument("--seed", type=int, default=0, help="draws the signals' order, steps and moments (default 0)")
    p.add_argument("--out", default="runs/bench_faults/faults.json", help="where the JSON result goes")
    p.add_argument("--work", default="runs/bench_faults",
                   help="the runs (replaced), their launch logs and the tiny data (kept) go here")
    args = p.parse_args()
    start = time.monotonic()
    data = build_data(os.path.join(args.work, "data"))
    rng = random.Random(args.seed)
    signals = ["SIGKILL"] * args.n + ["SIGTERM"] * args.n
    rng.shuffle(signals)
    steps = STEPS_PER_KILL * (len(signals) + 1)
    runs = {name: os.path.join(args.work, name) for name in ("interrupted", "reference")}
    for d in runs.values():
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    t0 = time.monotonic()
    with Launch(runs["reference"], run_args(data, runs["reference"], steps),
                os.path.join(runs["reference"], "launch.log")) as reference:
        failed = reference.wait()
    if failed:
        sys.exit(f"the reference run failed: see {runs['reference']}/launch.log")
    reference_s = time.monotonic() - t0
    print(f"reference: {steps} steps without interruption in {reference_s:.1f} s", flush=True)
    t0 = time.monotonic()
    kills = run_with_faults(data, runs["interrupted"], steps, signals, rng, lambda line: print(line, flush=True))
    interrupted_s = time.monotonic() - t0
    equal = compare_checkpoints(*(os.path.join(d, "checkpoints", f"step{steps:08d}") for d in runs.values()))
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "n": args.n, "seed": args.seed, "steps": steps, "checkpoint_interval": INTERVAL, "ranks": 2,
              **summarize(kills), "final_weights_bitwise_equal": equal["weights"],
              "final_optimizer_bitwise_equal": equal["optimizer"], "reference_s": round(reference_s, 1),
              "interrupted_s": round(interrupted_s, 1), "wall_s": round(time.monotonic() - start, 1),
              "per_kill": kills}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "per_kill"}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
