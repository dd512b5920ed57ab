"""The launcher scripts run the tiny config for real: torchrun.sh and deepspeed.sh on this machine,
and slurm/pretrain.sbatch for 2 nodes with stand-in srun/scontrol on PATH (each "node" is a
launcher on this machine): the command lines it builds, the preemption warning (save, exit 0,
requeue) and the resume of the requeued job."""
import os
import signal
import stat
import subprocess

import pytest

from tests.data_utils import ENV, ROOT, finish, losses, tiny_data, train_args
from tests.dist_utils import free_port
from tests.test_faults import _wait_for_steps

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in srun: run the command once per node of the job on this machine, forwarding signals
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i bash -c 'echo "task $SLURM_NODEID: NNODES=$NNODES NPROC_PER_NODE=$NPROC_PER_NODE \
MASTER_ADDR=$MASTER_ADDR RDZV_ID=$RDZV_ID" >> "$FAKE_SLURM_LOG"; exec "$@"' task "$@" &
    pids+=($!)
done
trap 'kill -USR1 ${pids[*]}' USR1
trap 'kill -TERM ${pids[*]}' TERM
code=0
for p in "${pids[@]}"; do
    while true; do c=0; wait "$p" || c=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$c" -ne 0 ] && code=$c
done
exit $code
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then tr , '\\n' <<< "$3"; fi
"""


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _script(name: str, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", name), *args], cwd=ROOT, env={**ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trained(out_dir, steps: int) -> None:
    assert sorted(losses(out_dir)) == list(range(1, steps + 1))
    assert (out_dir / "checkpoints" / f"step{steps:08d}" / "COMPLETE").exists()


@pytest.mark.parametrize("script, env", [("torchrun.sh", {"NPROC_PER_NODE": "2"}), ("deepspeed.sh", {"NUM_GPUS": "2"})])
def test_launcher_script_trains_tiny_config(data, tmp_path, script, env):
    proc = _script(script, train_args(data, str(tmp_path), "--train.steps", "3"), {**env, "MASTER_PORT": str(free_port())})
    code, log = finish(proc)
    assert code == 0, log
    assert "ranks = TP 1 x PP 1 x DP 2" in log
    _trained(tmp_path, 3)


def test_slurm_two_nodes_preempted_then_requeued_resumes(data, tmp_path):
    bin_dir, log_file = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log_file), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": ROOT,
           "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    out = tmp_path / "run"
    args = train_args(data, str(out), "--train.steps", "500")

    job = _script("slurm/pretrain.sbatch", args, env)
    _wait_for_steps(out, 2, job)
    job.send_signal(signal.SIGUSR1)                     # SLURM's --signal=B:USR1 preemption warning
    code, log = finish(job)
    assert code == 0, log
    last = max(losses(out))
    assert "2 nodes x 1, master localhost:" in log and "ranks = TP 1 x PP 1 x DP 2" in log
    calls = log_file.read_text().splitlines()
    assert calls[0] == "scontrol show hostnames localhost,127.0.0.1"
    assert calls[1] == "srun --ntasks-per-node=1 --kill-on-bad-exit=1 launch/torchrun.sh --resume auto " + " ".join(args)
    assert sorted(calls[2:4]) == [f"task {i}: NNODES=2 NPROC_PER_NODE=1 MASTER_ADDR=localhost RDZV_ID=4242"
                                  for i in range(2)]
    assert calls[4:] == ["scontrol requeue 4242"]
    assert (out / "checkpoints" / "latest").read_text() == f"step{last:08d}"

    job = _script("slurm/pretrain.sbatch", [*args, "--train.stop_at_step", str(last + 2)],
                  {**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())})
    code, log = finish(job)
    assert code == 0 and f"resumed from {out / 'checkpoints' / f'step{last:08d}'}" in log, log
    assert max(losses(out)) == last + 2
