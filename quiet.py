"""Known library noise, silenced at its source: every entry point imports this module before any
library, so that its logs show the project's own lines.

Each entry below is a message that a library prints on every run and that asks nothing of the user:

* megatron-core warns four times per process, at import, that Transformer Engine and Apex are not
  installed (Apex is optional here, DESIGN.md; torch's own fused paths are used); its dataset builder
  logs the whole GPTDataset config and every index-reader step at INFO, and Megatron-FSDP (unused)
  which implementation it picked;
* DeepSpeed warns "Setting accelerator to CPU" on CPU hosts (deliberate there) and that ZeRO runs an
  "untested optimizer" (pretrain.engine's AdamW, allowed on purpose); ``print``s that its
  shared-memory comm op was built (see :func:`without_known_prints`); setuptools' C compiler logs the
  gcc command lines of DeepSpeed's op checks at INFO;
* lm-eval logs its progress at INFO, Hugging Face datasets draws progress bars over the local task files.

Only those: the warnings and errors of these libraries, and any other message, still show.
"""
import contextlib
import io
import logging
import os
import sys
import warnings

# Library loggers whose INFO lines are all noise here: at WARNING they keep their warnings.
LOGGER_LEVELS = {"megatron.core.datasets": logging.WARNING, "megatron.core.distributed.fsdp": logging.WARNING,
                 "compilers": logging.WARNING, "lm_eval": logging.WARNING}
# Single messages of loggers whose other lines matter (by how the message starts).
LOGGER_MESSAGES = {"DeepSpeed": ("Setting accelerator to CPU.", "**** You are using ZeRO with an untested optimizer")}
WARNING_MESSAGES = [(UserWarning, "Transformer Engine and Apex are not installed", "megatron")]  # (category, message, module)
KNOWN_PRINTS = ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",)
ENVIRONMENT = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}     # read by datasets at its import


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _silence() -> None:
    for category, message, module in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name, starts in LOGGER_MESSAGES.items():   # DeepSpeed sets its logger's level when it creates it; a filter stays
        logging.getLogger(name).addFilter(_DropMessages(starts))
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def without_known_prints():
    """Runs a library call that ``print``s a KNOWN_PRINTS line instead of logging it: its stdout is held
    for the call, and every other line is passed on (also when the call raises)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        sys.stdout.write("".join(line for line in held.getvalue().splitlines(keepends=True)
                                 if not line.startswith(KNOWN_PRINTS)))


_silence()
