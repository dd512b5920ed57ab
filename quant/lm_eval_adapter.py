"""Zero-shot accuracy of our GPT through lm-evaluation-harness, offline.

``GPTLM`` answers lm-eval's loglikelihood requests (what lambada, piqa and arc_easy use); the
tasks are the local YAMLs in quant/tasks, whose data are the shipped files under data/eval
(``dataset_path: json``), so nothing is downloaded. Paths in the YAMLs are relative to the
repository root, which must be the working directory.
"""
import logging
import os
import time

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from quant.tasks import TASKS

log = logging.getLogger("quant")
TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


class GPTLM(LM):
    """lm-eval model over a TP=1 GPT (logits [s, b, V]) and its SentencePiece tokenizer."""

    def __init__(self, model, tokenizer, seq_len: int, batch_size: int = 16):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation, and
        the continuation's tokens are those of context+continuation after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.tokenize(context + continuation)
        ctx = self.tokenizer.tokenize(context) if context else []
        if not ctx:                                  # score from the end-of-document token
            return [self.tokenizer.eod], whole
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) per pair;
        inputs are cut on the left to the model's sequence length (a continuation longer than
        that is scored on the tokens that fit, as lm-eval's HF model does)."""
        out = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        start = time.perf_counter()
        for n, first in enumerate(range(0, len(order), self.batch_size)):
            batch = order[first:first + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.seq_len + 1):] for i in batch]
            width = max(len(s) for s in seqs) - 1
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for row, s in enumerate(seqs):           # right padding: causal, so harmless
                tokens[row, :len(s) - 1] = torch.tensor(s[:-1])
            logprobs = F.log_softmax(self.model(tokens.to(next(self.model.parameters()).device)).float(), dim=-1).transpose(0, 1).cpu()
            for row, (i, s) in enumerate(zip(batch, seqs)):
                n_cont = min(len(pairs[i][1]), len(s) - 1)   # a longer one: its last tokens
                target = torch.tensor(s[-n_cont:])
                lp = logprobs[row, len(s) - 1 - n_cont:len(s) - 1]
                out[i] = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
            if n % 50 == 49:
                done = first + len(batch)
                rate = done / (time.perf_counter() - start)
                log.info(f"  loglikelihood {done}/{len(pairs)} | {rate:.1f} req/s | "
                         f"ETA {(len(pairs) - done) / rate:.0f} s")
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("rolling loglikelihood is not needed by the post-training tasks")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation is not needed by the post-training tasks")


def run_tasks(lm: GPTLM, tasks, limit=None) -> dict[str, dict[str, float]]:
    """Zero-shot metrics {task: {metric: value}} of the local tasks (e.g. acc, acc_norm)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the local tasks are {TASKS}")
    if not os.path.isdir(os.path.join("data", "eval")):
        raise FileNotFoundError("data/eval not found: run from the repository root (the task YAMLs "
                                "name their files relative to it)")
    manager = TaskManager(include_path=TASK_DIR, include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                      limit=limit, bootstrap_iters=0, log_samples=False)["results"]
    return {task: {key.split(",")[0]: value for key, value in results[task].items()
                   if "," in key and "stderr" not in key and isinstance(value, (int, float))}
            for task in tasks}
