import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed


def _allreduce_rank():
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank1():
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return 0


def test_allreduce_runs_on_real_processes():
    assert run_distributed(_allreduce_rank, 3) == [6.0, 6.0, 6.0]


def test_failure_in_a_rank_is_reported():
    import pytest
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_fail_on_rank1, 2, timeout=60)
