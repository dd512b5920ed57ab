"""The training loop over a DeepSpeed engine: steps with gradient accumulation, validation,
QAT/kurtosis bookkeeping and metrics."""
import itertools
import logging

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import safe_set_full_fp32_param
from megatron.core import parallel_state

from model.gpt import linears
from model.pipeline import to_gpt_name
from pretrain.config import Config
from pretrain.engine import loss_scale, set_lr
from qat.quantizer import set_qat_step
from qat.kurtosis import set_grad_scale

log = logging.getLogger("pretrain")


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


def layer_names(model: torch.nn.Module, num_layers: int, pipeline: bool) -> dict:
    """{QAT quantizer or kurtosis penalty: the plain GPT's name of its linear} (``blocks.3.mlp.fc1``,
    whatever the layout: a pipeline stage names its layers by index), for metrics a reader can place."""
    names = {}
    for name, linear in linears(model):
        for m in (linear.input_quant, linear.output_stat):
            if m is not None:
                names[m] = to_gpt_name(name, num_layers) if pipeline else name
    return names


def dp_mean(values: torch.Tensor) -> torch.Tensor:
    """Average over the data-parallel group (every rank of it must call)."""
    values = values.clone()
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values / parallel_state.get_data_parallel_world_size()


class Trainer:
    def __init__(self, cfg: Config, engine, quantizers=(), penalties=(), logger=None):
        self.cfg, self.engine = cfg, engine
        self.quantizers, self.penalties = list(quantizers), list(penalties)
        self.logger = logger
        self.gas = engine.gradient_accumulation_steps()
        self.pipeline = isinstance(engine, PipelineEngine)
        self.names = layer_names(engine.module, cfg.model.num_layers, self.pipeline)
        self.step = 0                     # optimizer steps done
        self.consumed_samples = 0         # global samples consumed (the data position to resume from)
        self.skipped_steps = 0            # steps skipped for a non-finite loss or gradient, in the whole run
        self.nonfinite_in_row = 0
        self.last_checkpoint = None       # path of the newest checkpoint saved or resumed from (set by the loop)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # no host sync per step
        self._loss_count = 0
        self._clips_ready = not self.quantizers   # first-batch clip inits done (or none to do)

    def _init_clips(self, batch: dict) -> None:
        """First-batch clip inits (qat.init minmax|mse) happen here, in a forward without gradients
        before the step where quantization starts, and are written into the optimizer's fp32 master
        copy: set inside a training forward, they would be overwritten from that copy by the step.
        Every data-parallel replica runs DP rank 0's first micro-batch, the one a single process
        with the same micro-batch size initializes from, so the clips do not depend on the DP size
        (a statistic over each replica's own micro-batch would cover micro_batch_size x DP samples)."""
        todo = torch.tensor([float(any(q.needs_init for q in self.quantizers))], device=self.engine.device)
        dist.all_reduce(todo, op=dist.ReduceOp.MAX)      # pipeline stages run the forward together
        if todo.item():
            b = {k: v.to(self.engine.device).clone(memory_format=torch.contiguous_format) for k, v in batch.items()}
            for v in b.values():    # into copies: this rank's own batch still trains
                dist.broadcast(v, src=parallel_state.get_data_parallel_src_rank(),
                               group=parallel_state.get_data_parallel_group())
            self.engine.eval()
            # eager: the inits read statistics back to the host, which compiled blocks cannot trace
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                if self.pipeline:
                    self.engine.eval_batch(iter([(b["tokens"], b["labels"])]), num_micro_batches=1)
                else:
                    self.engine(b["tokens"], b["labels"])
            self.engine.train()
            for q in self.quantizers:
                safe_set_full_fp32_param(q.clip, q.clip.detach().float())
        self._clips_ready = True

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches) -> torch.Tensor:
        """One optimizer step over ``gas`` micro-batches from the iterator; returns the step's mean
        loss (detached): this rank's, or under pipeline parallelism the DP mean."""
        set_qat_step(self.quantizers, self.step, self.cfg.qat)
        set_lr(self.engine, self.step, self.cfg)
        set_grad_scale(loss_scale(self.engine) / self.gas)
        if not self.engine.module.training:    # a walk over every module: not on every step
            self.engine.train()
        batches = list(itertools.islice(micro_batches, self.gas))
        if len(batches) < self.gas:
            raise RuntimeError(f"the training data ran out at step {self.step}")
        if not self._clips_ready and self.step >= self.cfg.qat.start_step:
            self._init_clips(batches[0])
        self.engine.client_optimizer.nonfinite = None   # DeepSpeed's fp16 overflow check skips step() itself
        if self.pipeline:   # 1F1B over the micro-batches; the DP-mean loss comes back on every stage
            step_loss = self.engine.train_batch(iter([(b["tokens"], b["labels"]) for b in batches])).float()
        else:
            losses = []
            for batch in map(self._to_device, batches):
                loss = self.engine(batch["tokens"], batch["labels"])
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach().float())
            step_loss = torch.stack(losses).mean()
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        if self._finite_everywhere(step_loss):
            self.nonfinite_in_row = 0
            self._loss_sum += step_loss.double()
            self._loss_count += 1
        else:
            self._skip(step_loss)
        return step_loss

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank and AdamW found no non-finite gradient (which a
        finite loss can hide): one all-reduce and one host read a step, both checks in it."""
        ok = torch.isfinite(loss).float().reshape(1)
        nonfinite_grads = self.engine.client_optimizer.nonfinite
        if nonfinite_grads is not None:
            ok = ok * (1 - nonfinite_grads.to(ok.device).reshape(1))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _skip(self, loss: torch.Tensor) -> None:
        """The optimizer has already skipped the update (engine.AdamW, or DeepSpeed's own overflow
        check); count it, and give up after train.max_nonfinite_steps in a row."""
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        what = "loss" if not torch.isfinite(loss).item() else "gradient"
        log.warning(f"step {self.step}: non-finite {what} (loss {loss.item()} on rank {dist.get_rank()}); update "
                    f"skipped ({self.nonfinite_in_row} in a row, {self.skipped_steps} in this run)"
                    f"{self._inverted_clips()}")
        if self.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} steps in a row (up to step {self.step}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={limit}): aborting. The last checkpoint, saved before the streak: "
                f"{self.last_checkpoint or 'none'}; resume from it (--resume PATH) with a lower optim.lr, "
                f"bf16 instead of fp16, or model.norm_fp32: true")

    def _inverted_clips(self) -> str:
        """Names the QAT quantizers whose clips crossed (c_lo >= c_hi), which make their layer's
        output NaN (the kernels do not check per call: that would synchronize every layer)."""
        bad = [self.names[q] for q in self.quantizers if not q.clip[0] < q.clip[1]]
        if not bad:
            return ""
        return (f"; the QAT quantizers of {', '.join(bad)} have inverted clips c_lo >= c_hi: "
                f"lower optim.lr or qat.init_value")

    @torch.no_grad()
    def evaluate(self, micro_batches) -> float:
        """Mean validation loss over cfg.train.eval_iters global batches (the same sequences for any
        DP size: each rank runs its eval_iters x gradient-accumulation micro-batches), DP-averaged."""
        batches = list(itertools.islice(micro_batches, self.cfg.train.eval_iters * self.gas))
        if not batches:
            raise RuntimeError("the validation set yielded no batches")
        if self.pipeline:   # DP-mean loss, broadcast to every stage
            return self.engine.eval_batch(iter([(b["tokens"], b["labels"]) for b in batches]),
                                          num_micro_batches=len(batches)).item()
        self.engine.eval()
        losses = [self.engine(**self._to_device(b)).float() for b in batches]
        self.engine.train()
        return dp_mean(torch.stack(losses).mean()).item()

    def interval_metrics(self) -> tuple[dict, dict]:
        """(metrics since the last call for the log line, per-layer QAT clips / clipped fraction /
        output kurtosis under the layers' names: ``qat/blocks.3.mlp.fc1/c_lo``, ``kurtosis/blocks.3.mlp.fc2``;
        under pipeline parallelism this stage's layers). Collective over DP/TP: every rank calls."""
        loss = dp_mean(self._loss_sum.to(self.engine.device).float() / max(1, self._loss_count)).item()
        values = {"train/loss": loss} if self._loss_count else {}   # no loss for an interval of skipped steps
        self._loss_sum.zero_()
        self._loss_count = 0
        values.update({"train/lr": self.engine.get_lr()[0], "train/skipped_steps": self.skipped_steps})
        grad_norm = self.engine.get_global_grad_norm()   # None under ZeRO-0, which does not record it
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        if self.cfg.train.fp16:
            values["train/loss_scale"] = loss_scale(self.engine)
        layers = {}
        for q in self.quantizers:
            name = self.names[q]
            layers[f"qat/{name}/c_lo"], layers[f"qat/{name}/c_hi"] = q.clip.detach().float().tolist()
            if q.clip_fraction is not None:
                layers[f"qat/{name}/clipped"] = float(q.clip_fraction)
        means = [(p, p.last_mean()) for p in self.penalties]   # one TP all-reduce per site at most
        means = [(p, m) for p, m in means if m is not None]
        for p, m in means:
            layers[f"kurtosis/{self.names[p]}"] = float(m)
        if means:
            values["kurtosis/penalty"] = float(sum(p.penalty(m) for p, m in means))
            values["kurtosis/mean"] = float(torch.stack([m for _, m in means]).mean())
        return values, layers

    def record_layer_stats(self, on: bool) -> None:
        for m in self.quantizers + self.penalties:
            m.record_stats = on
