"""Tokenize raw text into one megatron-core indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    python -m data_prep.tokenize --input FILE... --tokenizer MODEL --output-prefix PREFIX --workers N \
        [--json-key text] [--append-eod]

Inputs are JSON lines or plain text, optionally .gz/.xz (formats in ``data_prep.documents``); several
inputs are merged, in the order given, into one dataset with one sequence per document. Tokens are
uint16 when the vocabulary is under 65,500, else int32 (megatron-core's ``DType.optimal_dtype``).
``PREFIX.json`` (the sidecar) records the tokenizer's SHA-256 and vocabulary size, the document and
token counts, and per-input statistics; training checks it against the model.

The main process streams and parses the input and writes the output; N worker processes encode.
The output does not depend on N. Everything is written under ``*.partial-<pid>`` names and renamed
into place only when complete, the sidecar last, so an interrupted run never leaves a dataset that
looks whole.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import collections
import json
import multiprocessing
import os
import signal
import sys
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from data_prep.documents import DocumentReader, MalformedLog, add_malformed_options, describe_malformed
from data_prep.tokenizer import load_tokenizer

CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortize the round trip
OUTPUT_EXTS = ("bin", "idx", "json")  # in the order they are renamed into place

_processor = None  # each worker's own SentencePiece model


def sidecar_path(prefix: str) -> str:
    return f"{prefix}.json"


def read_sidecar(prefix: str) -> dict:
    """The sidecar of a dataset; its absence means the dataset was not completely written."""
    try:
        with open(sidecar_path(prefix)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset {prefix!r} has no sidecar {sidecar_path(prefix)}: it was not "
                                "written (completely) by `python -m data_prep.tokenize`") from None


def _init_worker(model_path: str) -> None:
    global _processor
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM
    _processor = spm.SentencePieceProcessor(model_file=model_path, num_threads=1)


def _encode(texts: list[str], dtype: str, eod: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of documents: their concatenated tokens and each one's length."""
    docs = _processor.encode(texts, return_type="numpy")
    if eod is not None:
        docs = [np.append(doc, eod) for doc in docs]
    return np.concatenate(docs).astype(dtype), np.array([len(doc) for doc in docs], np.int64)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    texts, size = [], 0
    for text in documents:
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield texts
            texts, size = [], 0
    if texts:
        yield texts


def _ordered_map(pool, fn, arg_tuples: Iterable[tuple], depth: int) -> Iterator:
    """Like ``pool.imap`` (results in order) but reads its input only ``depth`` tasks ahead, so that
    the input is streamed instead of queued whole in memory."""
    pending = collections.deque()
    for args in arg_tuples:
        pending.append(pool.apply_async(fn, args))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def tokenize_files(inputs: list[str], tokenizer: str, output_prefix: str, workers: int = 1,
                   json_key: str = "text", append_eod: bool = False, max_malformed: int = 100,
                   max_malformed_fraction: float = 0.01, overwrite: bool = False) -> dict:
    """Write the dataset ``output_prefix`` from ``inputs``; returns its sidecar."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    tok = load_tokenizer(tokenizer)
    final = {ext: f"{output_prefix}.{ext}" for ext in OUTPUT_EXTS}
    existing = [path for path in final.values() if os.path.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    log = MalformedLog(max_malformed, max_malformed_fraction)
    readers = [DocumentReader(path, log, json_key) for path in inputs]  # checks every input up front
    dtype = np.dtype(DType.optimal_dtype(tok.vocab_size))
    eod = tok.eod if append_eod else None
    partial = {ext: f"{path}.partial-{os.getpid()}" for ext, path in final.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        builder = IndexedDatasetBuilder(partial["bin"], dtype=dtype.type)
        sources = []
        with multiprocessing.Pool(workers, _init_worker, (tokenizer,)) as pool, tqdm(
                total=sum(r.size for r in readers), unit="B", unit_scale=True, desc="input") as bar:
            documents = tokens = 0
            for reader in readers:
                read_before, reader_tokens = bar.n, 0
                tasks = ((texts, dtype.str, eod) for texts in _chunks(reader))
                for chunk_tokens, lengths in _ordered_map(pool, _encode, tasks, depth=2 * workers):
                    for doc in np.split(chunk_tokens, np.cumsum(lengths)[:-1]):
                        builder.add_document(doc, [len(doc)])
                    documents += len(lengths)
                    reader_tokens += len(chunk_tokens)
                    bar.update(read_before + reader.position - bar.n)
                    rate = bar.format_dict["elapsed"] or float("inf")
                    bar.set_postfix_str(f"{documents / rate:.0f} docs/s, "
                                        f"{(tokens + reader_tokens) / rate:.0f} tokens/s", refresh=False)
                tokens += reader_tokens
                sources.append({"path": reader.path, "bytes": reader.size, "documents": reader.documents,
                                "tokens": reader_tokens, "empty": reader.empty, "malformed": reader.malformed})
        log.check_fraction(sum(r.records for r in readers))
        if documents == 0:
            raise ValueError(f"no documents in {', '.join(inputs)}: nothing written")
        builder.finalize(partial["idx"])
        sidecar = {
            "format": "megatron-core indexed dataset (MMIDIDX v1)", "dtype": dtype.name,
            "tokenizer": tok.path, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
            "append_eod": append_eod, "eod_id": tok.eod,
            "documents": documents, "tokens": tokens,
            "malformed": log.count, "first_malformed": [list(entry) for entry in log.first],
            "sources": sources,
        }
        with open(partial["json"], "w") as f:
            json.dump(sidecar, f, indent=2)
        if os.path.exists(final["json"]):
            os.remove(final["json"])  # an old sidecar must never describe new token files
        for ext in OUTPUT_EXTS:
            os.replace(partial[ext], final[ext])
    except BaseException:
        for path in partial.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    return sidecar


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", dest="inputs", metavar="FILE", nargs="+", required=True,
                   help="jsonl/json/txt files, optionally .gz/.xz; merged in this order")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--json-key", default="text", help="key of the document text in JSON lines")
    p.add_argument("--append-eod", action="store_true", help="end every document with </s>")
    add_malformed_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # preemption: clean up like Ctrl-C
    try:
        sidecar = tokenize_files(**vars(args))
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.output_prefix}.{{bin,idx,json}}: {sidecar['documents']} documents, "
          f"{sidecar['tokens']} tokens ({sidecar['dtype']})")
    if sidecar["malformed"]:
        print(f"skipped {sidecar['malformed']} malformed lines, first: "
              f"{describe_malformed(sidecar['first_malformed'])}")


if __name__ == "__main__":
    main()
