"""Train a SentencePiece tokenizer on raw text.

    python -m data_prep.train_tokenizer --input FILE... --vocab-size N --model-type bpe|unigram --output PREFIX

Writes ``PREFIX.model``, ``PREFIX.vocab`` and ``PREFIX.json`` (the model's SHA-256 and the training
settings). Special ids are fixed (see ``data_prep.tokenizer``); byte fallback means any text encodes
without ``<unk>``, and identity normalization keeps whitespace, so decoding gives the text back.

Training sentences are the non-empty lines (paragraphs) of every document. A uniform random sample
of at most ``--max-sentences`` of them is kept (reservoir sampling while streaming, deterministic by
``--seed``), so a huge corpus does not exhaust memory. SentencePiece's own sampling is not used: it
ignores the seed, so the same corpus would give different models.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import io
import json
import os
import random
import sys
from typing import Iterator

import sentencepiece as spm
from tqdm import tqdm

from data_prep.documents import DocumentReader, MalformedLog, add_malformed_options
from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, file_sha256


def training_sentences(readers: list[DocumentReader]) -> Iterator[str]:
    """Every non-empty line of every document, with a progress bar over the input bytes."""
    with tqdm(total=sum(r.size for r in readers), unit="B", unit_scale=True, desc="reading") as bar:
        for reader in readers:
            done = bar.n
            for document in reader:
                yield from (line for line in document.split("\n") if line.strip())
                bar.update(done + reader.position - bar.n)


def reservoir_sample(items: Iterator[str], k: int, seed: int) -> tuple[list[str], int]:
    """A uniform random sample of at most ``k`` items in O(k) memory, and the number of items seen."""
    rng, sample, seen = random.Random(seed), [], 0
    for seen, item in enumerate(items, 1):
        if len(sample) < k:
            sample.append(item)
        elif (j := rng.randrange(seen)) < k:
            sample[j] = item
    return sample, seen


def _write_atomically(path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file."""
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def train_tokenizer(inputs: list[str], vocab_size: int, model_type: str, output: str,
                    json_key: str = "text", max_sentences: int = 2_000_000,
                    max_sentence_length: int = 16384, max_malformed: int = 100,
                    max_malformed_fraction: float = 0.01, seed: int = 1234,
                    threads: int = os.cpu_count() or 1) -> dict:
    """Train and write ``output.{model,vocab,json}``; returns the metadata written to the JSON file."""
    log = MalformedLog(max_malformed, max_malformed_fraction)
    readers = [DocumentReader(path, log, json_key) for path in inputs]
    sentences, seen = reservoir_sample(training_sentences(readers), max_sentences, seed)
    log.check_fraction(sum(r.records for r in readers))
    model = io.BytesIO()  # not model_prefix: SentencePiece would store that path in the model
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, input_sentence_size=0,
        max_sentence_length=max_sentence_length, num_threads=threads,
        byte_fallback=True, character_coverage=0.9995, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=1,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    _write_atomically(f"{output}.model", model.getvalue())
    _write_atomically(f"{output}.vocab", vocab.encode())
    meta = {
        "model": os.path.basename(f"{output}.model"),
        "sha256": file_sha256(f"{output}.model"),
        "vocab_size": vocab_size,
        "model_type": model_type,
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "byte_fallback": True,
        "max_sentences": max_sentences,
        "sentences_seen": seen,
        "sentences_sampled": len(sentences),
        "seed": seed,
        "threads": threads,  # SentencePiece's result depends on it
        "inputs": [{"path": r.path, "documents": r.documents, "empty": r.empty, "malformed": r.malformed}
                   for r in readers],
    }
    _write_atomically(f"{output}.json", json.dumps(meta, indent=2).encode())
    return meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", dest="inputs", metavar="FILE", nargs="+", required=True,
                   help="jsonl/json/txt files, optionally .gz/.xz")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], required=True)
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model, .vocab, .json")
    p.add_argument("--json-key", default="text", help="key of the document text in JSON lines")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="sample at most this many lines for training (bounds memory)")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines (bytes) are skipped")
    add_malformed_options(p)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        meta = train_tokenizer(**vars(args))
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: SentencePiece wraps our errors
        sys.exit(f"error: {err}")
    print(f"wrote {args.output}.model (sha256 {meta['sha256']}, vocab {meta['vocab_size']})")


if __name__ == "__main__":
    main()
