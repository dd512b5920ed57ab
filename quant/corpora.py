"""The evaluation and calibration texts of post-training, as token windows.

C4 (data/eval/c4-sample, 1,000 documents) is split once: documents [0, CALIB_DOCS) are the GPTQ
and analysis calibration slice, documents [CALIB_DOCS, end) the C4 perplexity slice, so no
document is both calibrated on and evaluated on.

- calibration: the slice's documents, each followed by the end-of-document token, as one stream;
  ``n`` windows of the model's sequence length at seeded random offsets (GPTQ's recipe of random
  windows, without requiring every document to be a full window long).
- perplexity (GPTQ convention): documents joined with "\\n\\n", tokenized once, cut into
  non-overlapping windows of the sequence length, the tail dropped.
"""
import os

import torch

from data_prep.documents import EVAL_DIR, DocumentReader, MalformedLog

C4 = os.path.join(EVAL_DIR, "c4-sample", "c4-sample.00000-of-00001.json.gz")
WIKITEXT2 = os.path.join(EVAL_DIR, "wikitext-2-raw", "wiki.test.raw")
CALIB_DOCS = 500
C4_EVAL_WINDOWS = 256            # GPTQ evaluates C4 on 256 windows


def read_documents(path: str) -> list[str]:
    """The documents of a calibration or evaluation file, in data_prep's input formats (JSON lines,
    or blank-line-separated text blocks, optionally .gz/.xz); a malformed line is an error."""
    return list(DocumentReader(path, MalformedLog(limit=0), training=False))


def c4_split() -> tuple[list[str], list[str]]:
    """(calibration documents, evaluation documents) of the C4 sample."""
    docs = read_documents(C4)
    return docs[:CALIB_DOCS], docs[CALIB_DOCS:]


def calibration_windows(tokenizer, seq_len: int, n: int, seed: int, path: str | None = None) -> torch.Tensor:
    """[n, seq_len] token windows at random offsets of the calibration stream (C4's calibration
    slice, or the documents of ``path``)."""
    docs = read_documents(path) if path else c4_split()[0]
    stream = [t for doc in docs for t in tokenizer.tokenize(doc) + [tokenizer.eod]]
    if len(stream) < seq_len:
        raise ValueError(f"calibration text has {len(stream)} tokens, fewer than one window of {seq_len}")
    stream = torch.tensor(stream)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (n,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def perplexity_windows(tokenizer, docs: list[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[windows, seq_len] non-overlapping windows of the documents joined with blank lines."""
    tokens = torch.tensor(tokenizer.tokenize("\n\n".join(docs)))
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    return tokens[:n * seq_len].view(n, seq_len)


def perplexity_sets(tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """The perplexity benchmarks: WikiText-2 test (whole) and the C4 evaluation slice."""
    with open(WIKITEXT2, encoding="utf-8") as f:
        wikitext = f.read()
    # wiki.test.raw is the HF dataset's rows, each a line with its newline; GPTQ joins the rows.
    lines = [line + "\n" for line in wikitext.split("\n")[:-1]]
    return {"wikitext2": perplexity_windows(tokenizer, lines, seq_len),
            "c4": perplexity_windows(tokenizer, c4_split()[1], seq_len, C4_EVAL_WINDOWS)}
