"""Shared test setup: one intra-op thread per process, so multi-process gloo tests
do not oversubscribe the 2-core CI machine."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
