"""What a training run reports: log lines with rates and ETA, TensorBoard scalars, FLOPs and MFU."""
import json
import logging
import os
import resource
import time

import torch

from model.config import GPTConfig

log = logging.getLogger("pretrain")

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name, for MFU when train.peak_tflops is 0.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with parameters (N excludes the embedding
    tables, which are lookups) plus 12 L d T for attention scores and values."""
    return 6.0 * n_params + 12.0 * cfg.num_layers * cfg.hidden_size * cfg.seq_length


def matmul_params(cfg: GPTConfig) -> int:
    """Parameters that take part in matmuls, for the whole (unsharded) model."""
    d, f = cfg.hidden_size, cfg.ffn_size
    fc1 = f * (2 if cfg.mlp == "swiglu" else 1)
    per_block = 3 * d * d + d * d + d * fc1 + f * d
    return cfg.num_layers * per_block + d * cfg.vocab_size


def peak_tflops(configured: float) -> float:
    if configured > 0:
        return configured
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class MetricsLogger:
    """Log lines and TensorBoard scalars, written by one rank (the caller decides which)."""

    def __init__(self, out_dir: str | None, total_steps: int, tokens_per_step: int, flops_per_step: float,
                 world_size: int, peak: float, start_step: int):
        self.writer = self.jsonl = None
        if out_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_step, self.world_size, self.peak = flops_per_step, world_size, peak
        self._t0, self._step0 = time.perf_counter(), start_step

    def scalars(self, step: int, values: dict) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def validation(self, step: int, loss: float) -> None:
        """A validation loss: TensorBoard, and its own metrics.jsonl line ({"step", "valid/loss"})."""
        self.scalars(step, {"valid/loss": loss})
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "valid/loss": loss}) + "\n")
            self.jsonl.flush()

    def interval(self, step: int, values: dict, layers: dict) -> None:
        """Log the metrics of the steps since the last call, with rates and ETA; the per-layer ones
        (Trainer.interval_metrics) go to TensorBoard and, under ``layers``, to metrics.jsonl."""
        now = time.perf_counter()
        steps = max(1, step - self._step0)
        dt = (now - self._t0) / steps
        rates = {"perf/step_time_s": dt, "perf/tokens_per_s": self.tokens_per_step / dt,
                 "perf/memory_gib": memory_gib()}
        tflops = self.flops_per_step / dt / 1e12 / self.world_size
        if torch.cuda.is_available():
            rates["perf/tflops_per_gpu"] = tflops
            if self.peak:
                rates["perf/mfu"] = tflops / self.peak
        self.scalars(step, {**values, **rates, **layers})
        if self.jsonl:   # exact values (repr of the floats), one line per interval, for tools and tests
            self.jsonl.write(json.dumps({"step": step, **values, "layers": layers}) + "\n")
            self.jsonl.flush()
        eta = dt * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k.removeprefix('train/')} {v:.4g}" for k, v in values.items()]
        parts += [f"{rates['perf/tokens_per_s']:.0f} tok/s", f"{dt * 1000:.0f} ms/step"]
        if "perf/mfu" in rates:
            parts.append(f"{tflops:.1f} TFLOP/s/gpu mfu {rates['perf/mfu']:.1%}")
        parts += [f"mem {rates['perf/memory_gib']:.2f} GiB", f"eta {eta / 60:.1f} min"]
        log.info(" | ".join(parts))
        self._t0, self._step0 = now, step

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.jsonl.close()
