"""Run a function on N real torch.distributed (gloo) processes and collect what each returns.

Tests use this instead of mocks: every collective really runs, over TCP on localhost.
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server process that has imported torch, megatron-core, DeepSpeed and the
# project (set before its first use), so a rank starts in well under a second instead of
# re-importing them. The server is a fresh interpreter that only imports (one thread, no process
# group, no megatron parallel state), so every rank still starts from clean global state; it keeps
# the environment of its start (conftest's OMP_NUM_THREADS, TRITON_INTERPRET), and each rank
# follows the test's current directory and sys.path as under spawn.
mp.set_forkserver_preload(["tests.train_utils"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report any failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600):
    """Call ``fn(*args)`` on ``world_size`` fresh processes (forked from the forkserver); return the
    list of results by rank.

    ``fn`` must be a module-level function (it is pickled). It may call
    ``dist.init_process_group("gloo")`` itself, or use the project's own init, which reads the
    launcher environment set here (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
            join=False, start_method="forkserver",
        )
        errors = []
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:  # a child failed: gather every rank's traceback
            errors.append(str(e))
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} produced no result")
                continue
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                errors.append(f"rank {rank}:\n{rec['error']}")
            results.append(rec.get("result"))
        if errors:
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
        return results
