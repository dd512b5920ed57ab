"""Shared test setup.

One intra-op thread per process, so multi-process gloo tests do not oversubscribe the 2-core
CI machine; and Triton kernels run under the interpreter when there is no GPU (it is read when
a kernel is decorated, so it must be set before any kernel module is imported).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")  # spawned ranks: keep library warnings out of logs

import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
