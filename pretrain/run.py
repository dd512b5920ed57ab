"""A training run whose config passed ``pretrain.config.validate``: the data checks, the distributed
job, the run lock, the training loop, and the exit code of each way it ends. Apart from the command
line (``pretrain.train``), which imports it once the config is read, so that ``--help`` and a bad
config need no torch, megatron-core or DeepSpeed."""
import logging
import signal
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_prep.datasets import build_datasets, check_data_files, check_tokenizer, micro_batches
from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError
from pretrain.config import Config, ConfigError
from pretrain.engine import build_engine
from pretrain.metrics import MetricsLogger, flops_per_token, matmul_params, peak_tflops
from pretrain.parallel_dims import ParallelDims, destroy_distributed, init_distributed
from pretrain.parallelize import build_model
from pretrain.trainer import NonFiniteLossError, Trainer
from qat.quantizer import attach_qat
from qat.kurtosis import attach_kurtosis

log = logging.getLogger("pretrain")


class StopSignal:
    """Remembers SIGTERM/SIGUSR1; ranks agree on stopping through an all-reduce each step."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning(f"received signal {signum}: will save and exit after this step")
        self.received = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor([float(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def is_logging_rank() -> bool:
    return (parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.is_pipeline_last_stage())


def build_trainer(cfg: Config, dims: ParallelDims) -> Trainer:
    """This rank's model (QAT quantizers and kurtosis penalties attached before the engine takes its
    parameters), engine and trainer, at step 0."""
    torch.manual_seed(cfg.train.seed)          # identical initial weights on every rank
    model = build_model(cfg, dims)
    quantizers, penalties = attach_qat(model, cfg.qat), attach_kurtosis(model, cfg.kurtosis)
    return Trainer(cfg, build_engine(model, cfg, dims), quantizers, penalties)


def train(cfg: Config, dims: ParallelDims) -> Trainer:
    t = cfg.train
    trainer = build_trainer(cfg, dims)
    engine, model = trainer.engine, trainer.engine.module
    # Dropout masks: the same over TP ranks holding replicated activations, distinct under SP and
    # per stage. A resume replaces these streams with the ones saved by the same rank (a resharded
    # one, of another layout, keeps these).
    sp_rank = parallel_state.get_tensor_model_parallel_rank() if cfg.parallel.sequence_parallel else 0
    torch.manual_seed(t.seed + 100 * parallel_state.get_pipeline_model_parallel_rank() + sp_rank)
    trainer.last_checkpoint = checkpoint.resume(engine, trainer, cfg)
    if trainer.step >= t.steps:               # a relaunch of a finished run: nothing to do, nothing rewritten
        log.info(f"already finished at step {trainer.step} (train.steps {t.steps}); nothing to do")
        return trainer

    n_eval = t.eval_iters * t.global_batch_size
    evals = t.steps // t.eval_interval + 1 if t.eval_interval else 1
    train_ds, valid_ds = build_datasets(cfg.data, cfg.model.seq_length, t.seed,
                                        t.steps * t.global_batch_size, evals * n_eval)
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = micro_batches(train_ds, trainer.consumed_samples, t.micro_batch_size, dp_rank, dims.dp)

    def validation_loss():
        if valid_ds is None:
            return None
        return trainer.evaluate(micro_batches(valid_ds, 0, t.micro_batch_size, dp_rank, dims.dp))

    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    logger = None
    if is_logging_rank():
        logger = MetricsLogger(t.out_dir, t.steps, tokens_per_step,
                               flops_per_token(cfg.model, matmul_params(cfg.model)) * tokens_per_step,
                               dims.world, peak_tflops(t.peak_tflops), trainer.step)
        log.info(f"{sum(p.numel() for p in model.parameters()):,} parameters on this rank; "
                 f"{dims.world} ranks = TP {dims.tp} x PP {dims.pp} x DP {dims.dp}; "
                 f"gradient accumulation {trainer.gas}; starting at step {trainer.step}")
    stop = StopSignal()
    saved_step = None

    def save() -> None:
        """A checkpoint of this step, unless its update was skipped: one saved inside a non-finite
        streak would hold what caused it, and resuming from it would abort again."""
        nonlocal saved_step
        if trainer.nonfinite_in_row:
            log.warning(f"step {trainer.step}: not saving a checkpoint, the step's loss was non-finite "
                        f"(the last one saved: {trainer.last_checkpoint})")
            return
        trainer.last_checkpoint = checkpoint.save(engine, trainer, cfg, model)
        saved_step = trainer.step

    while trainer.step < t.steps:
        stats_step = (trainer.step + 1) % t.log_interval == 0 or trainer.step + 1 == t.steps
        trainer.record_layer_stats(stats_step)
        trainer.train_step(batches)
        if stats_step:
            values, layers = trainer.interval_metrics()
            if logger:
                logger.interval(trainer.step, values, layers)
        if t.eval_interval and trainer.step % t.eval_interval == 0 and trainer.step < t.steps:
            loss = validation_loss()
            if logger and loss is not None:
                logger.validation(trainer.step, loss)
                log.info(f"step {trainer.step} | valid loss {loss:.4f}")
        interval = cfg.checkpoint.interval
        if interval and trainer.step % interval == 0:
            save()
        if stop.any_rank(engine.device) or trainer.step == t.stop_at_step:
            if saved_step != trainer.step:
                save()
            log.warning(f"stopped at step {trainer.step} ({'signal' if stop.received else 'train.stop_at_step'}); "
                        f"resume with --resume auto")
            if logger:
                logger.close()
            return trainer
    loss = validation_loss()
    if logger and loss is not None:
        logger.validation(trainer.step, loss)
        log.info(f"final valid loss {loss:.4f}")
    if saved_step != trainer.step:
        save()
    if logger:
        logger.close()
    return trainer


def run(cfg: Config) -> int:
    """Train ``cfg`` in this process's place of the job; the exit code (see ``pretrain.train``)."""
    try:   # the data must be whole and match the tokenizer and vocabulary before any work starts
        check_data_files(cfg.data)
        check_tokenizer(cfg.data, cfg.model.vocab_size)
    except (OSError, ValueError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    dims = init_distributed(cfg.parallel)
    if not is_logging_rank():
        logging.getLogger().setLevel(logging.WARNING)
    lock = checkpoint.RunLock(cfg.train.out_dir) if dist.get_rank() == 0 else None
    refused = lock.acquire() if lock else None
    flag = torch.tensor([float(refused is not None)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)       # every rank learns rank 0's answer
    if flag.item():
        if refused:
            print(f"run error: {refused}", file=sys.stderr)
        destroy_distributed()
        return 2
    try:
        train(cfg, dims)
    except CheckpointError as e:        # damaged, or holding more than tensors
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:            # e.g. a checkpoint that does not fit this run
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"training aborted: {e}", file=sys.stderr)
        return 1
    finally:
        if lock:
            lock.release()
        destroy_distributed()
    return 0

