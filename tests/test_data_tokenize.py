"""Tokenizer training and corpus tokenization: round trips, file format, bad input, interruption."""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.documents import EVAL_DIR, DocumentReader, MalformedInputError, MalformedLog
from data_prep.tokenize import read_sidecar, tokenize_files
from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, file_sha256, load_tokenizer
from data_prep.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEMO = [str(REPO / "data" / "demo" / name) for name in ("wikipedia.jsonl.xz", "gutenberg.jsonl.xz")]


def train_small_tokenizer(directory, vocab_size: int = 1000, model_type: str = "bpe") -> str:
    """A small tokenizer trained on the demo Wikipedia text (about a second); returns the .model path."""
    prefix = os.path.join(directory, f"{model_type}{vocab_size}")
    train_tokenizer(DEMO[:1], vocab_size, model_type, prefix, threads=1)
    return prefix + ".model"


def documents(path: str) -> list[str]:
    return list(DocumentReader(path, MalformedLog(0)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_tokenizer_has_fixed_special_ids_byte_fallback_and_recorded_hash(tmp_path, model_type):
    model = train_small_tokenizer(tmp_path, 600, model_type)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert [sp.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert sp.vocab_size() == 600
    text = "Ünïcödé ☃ 日本語\n  two  spaces\tand a tab"  # characters the demo lacks; whitespace
    ids = sp.encode(text)
    assert UNK_ID not in ids and sp.decode(ids) == text
    meta = json.loads(Path(model).with_suffix(".json").read_text())
    assert meta["sha256"] == file_sha256(model) == load_tokenizer(model).sha256
    assert meta["special_ids"] == {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


def test_sampling_cap_bounds_training_sentences_and_training_is_deterministic(tmp_path):
    metas = [train_tokenizer(DEMO[:1], 400, "bpe", str(tmp_path / f"capped{i}"), max_sentences=300, threads=1)
             for i in range(2)]
    assert metas[0]["sentences_sampled"] == 300 < metas[0]["sentences_seen"]
    assert metas[0]["sha256"] == metas[1]["sha256"]  # same corpus and seed: the same model
    full = train_tokenizer(DEMO[:1], 400, "bpe", str(tmp_path / "full"), threads=1)
    assert full["sentences_sampled"] == full["sentences_seen"] == metas[0]["sentences_seen"]
    assert full["sha256"] != metas[0]["sha256"]  # the 300-line sample learned other merges


def test_round_trip_equals_direct_encoding_and_megatron_reads_it(tmp_path, tokenizer):
    prefix = str(tmp_path / "demo")
    side = tokenize_files(DEMO, tokenizer, prefix, workers=2, append_eod=True)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    expected = [sp.encode(text) + [EOS_ID] for path in DEMO for text in documents(path)]

    ds = IndexedDataset(prefix)  # megatron-core's own reader
    assert len(ds) == len(expected) == side["documents"]
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert ds.index.dtype == np.uint16
    assert side["tokens"] == sum(map(len, expected)) == int(ds.sequence_lengths.sum())
    assert side["tokenizer_sha256"] == file_sha256(tokenizer) and side["vocab_size"] == sp.vocab_size()
    assert [s["documents"] for s in side["sources"]] == [len(documents(p)) for p in DEMO]

    with open(prefix + ".idx", "rb") as f:  # the documented MMIDIDX header
        magic, version, code, n_seq, n_doc = struct.unpack("<9sQBQQ", f.read(34))
    assert (magic, version, code) == (b"MMIDIDX\x00\x00", 1, 8)  # dtype code 8 = uint16
    assert (n_seq, n_doc) == (len(expected), len(expected) + 1)
    assert os.path.getsize(prefix + ".bin") == 2 * side["tokens"]


def test_output_does_not_depend_on_worker_count(tmp_path, tokenizer):
    for workers in (1, 2):
        tokenize_files(DEMO[:1], tokenizer, str(tmp_path / f"w{workers}"), workers=workers)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes()


def test_plain_text_documents_are_blank_line_separated_blocks(tmp_path, tokenizer):
    text = "First doc, line one.\nLine two.\n\n\n  \nSecond doc.\n\nThird doc without final newline"
    path = tmp_path / "corpus.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    assert documents(str(path)) == ["First doc, line one.\nLine two.", "Second doc.",
                                    "Third doc without final newline"]
    tokenize_files([str(path)], tokenizer, str(tmp_path / "txt"))
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ds = IndexedDataset(str(tmp_path / "txt"))
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(d) for d in documents(str(path))]


def write_broken_jsonl(path) -> list[str]:
    """A JSON-lines file with one bad line of each kind; returns the good documents."""
    lines = [b'{"text": "good one"}', b'{"text": "broken', b'{"text": "good two"}', b'{"body": "no key"}',
             b'{"text": "bad \xff\xfe bytes"}', b'{"text": ""}', b'', b'[1, 2]', b'{"text": "good three"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    return ["good one", "good two", "good three"]


def test_broken_lines_are_skipped_counted_and_located(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    good = write_broken_jsonl(path)
    side = tokenize_files([str(path)], tokenizer, str(tmp_path / "out"), max_malformed_fraction=1)
    assert side["documents"] == len(good) and side["malformed"] == 4
    assert [(line, reason.split()[1]) for _, line, reason in side["first_malformed"]] == [
        (2, "not"), (4, "no"), (5, "not"), (8, "no")]
    assert "UTF-8" in side["first_malformed"][2][2] and "JSON" in side["first_malformed"][0][2]
    assert side["sources"][0]["empty"] == 1
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == sp.encode(good)


def assert_no_dataset(prefix: Path) -> None:
    assert not IndexedDataset.exists(str(prefix))
    assert sorted(p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name)) == []


def test_too_many_broken_lines_fail_clearly_and_leave_nothing(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    write_broken_jsonl(path)
    with pytest.raises(MalformedInputError, match=r"4 malformed lines, more than the limit of 3.*jsonl:2 "):
        tokenize_files([str(path)], tokenizer, str(tmp_path / "out"), max_malformed=3)
    assert_no_dataset(tmp_path / "out")


def test_existing_dataset_is_not_overwritten_unless_asked(tmp_path, tokenizer):
    prefix = str(tmp_path / "out")
    tokenize_files(DEMO[1:], tokenizer, prefix)
    before = Path(prefix + ".bin").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        tokenize_files(DEMO[:1], tokenizer, prefix)
    assert Path(prefix + ".bin").read_bytes() == before
    tokenize_files(DEMO[:1], tokenizer, prefix, overwrite=True)
    assert read_sidecar(prefix)["sources"][0]["path"] == DEMO[0]


def test_evaluation_data_unknown_formats_and_empty_input_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="evaluation data"):
        tokenize_files([str(EVAL_DIR / "lambada" / "lambada_test.jsonl")], tokenizer, str(tmp_path / "x"))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="no documents in .*empty.jsonl: nothing written"):
        tokenize_files([str(tmp_path / "empty.jsonl")], tokenizer, str(tmp_path / "x"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown input format"):
        tokenize_files([str(tmp_path / "data.csv")], tokenizer, str(tmp_path / "x"))
    assert_no_dataset(tmp_path / "x")


def test_killed_run_leaves_no_complete_looking_dataset(tmp_path, tokenizer):
    """SIGKILL mid-run (no chance to clean up): only *.partial-* files may remain."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    prefix = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.tokenize", "--input", str(fifo), "--tokenizer",
                             tokenizer, "--output-prefix", str(prefix), "--workers", "1"],
                            cwd=REPO, stderr=subprocess.DEVNULL)
    with open(fifo, "w") as writer:  # blocks until the tokenizer opens the input
        writer.write(json.dumps({"text": "some text " * 1000}) + "\n")
        writer.flush()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("out.bin.partial-*")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not IndexedDataset.exists(str(prefix))
    assert not Path(str(prefix) + ".json").exists()
    assert all(".partial-" in p.name for p in tmp_path.glob("out.*"))


def test_cli_reports_counts_and_fails_past_threshold(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    write_broken_jsonl(path)
    base = [sys.executable, "-m", "data_prep.tokenize", "--input", str(path), "--tokenizer", tokenizer,
            "--output-prefix", str(tmp_path / "out"), "--workers", "2", "--max-malformed-fraction", "1"]
    ok = subprocess.run(base, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "3 documents" in ok.stdout and "skipped 4 malformed lines, first: " in ok.stdout
    assert "broken.jsonl:2 is not JSON" in ok.stdout
    assert "docs/s" in ok.stderr and "B/s" in ok.stderr  # the progress bar
    failed = subprocess.run(base + ["--max-malformed", "2", "--overwrite"], cwd=REPO,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "error: 3 malformed lines, more than the limit of 2" in failed.stderr
    assert IndexedDataset(str(tmp_path / "out")).sequence_lengths.size == 3  # the earlier dataset is intact


def write_corpus(path, lines: int, malformed) -> None:
    """JSON lines, those numbered (from 0) in ``malformed`` broken."""
    path.write_text("".join('{"text": "broken\n' if i in malformed else f'{{"text": "doc {i}"}}\n'
                            for i in range(lines)))


def test_malformed_fraction_is_judged_over_the_whole_input(tmp_path, tokenizer):
    bad, fine = tmp_path / "bad.jsonl", tmp_path / "fine.jsonl"
    write_corpus(bad, 100, [i for i in range(100) if i % 10 < 3])  # 30 %: under the absolute limit of 100
    write_corpus(fine, 200, [100])                                  # 0.5 %: under the 1 % default
    cli = lambda path, *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "data_prep.tokenize", "--input", str(path), "--tokenizer", tokenizer,
         "--output-prefix", str(tmp_path / f"{path.stem}.out"), *extra], cwd=REPO, capture_output=True, text=True)
    failed = cli(bad)
    reason = "is not JSON (Invalid control character at)"  # the newline inside the open string
    message = ("30 malformed lines of 100 input records (30.0%), more than the limit of 1% (first: "
               + "; ".join(f"{bad}:{line} {reason}" for line in (1, 2, 3, 11, 12))
               + "); fix the input, or raise the limit if skipping them is intended")
    assert failed.returncode == 1 and failed.stderr.splitlines()[-1] == f"error: {message}"
    assert_no_dataset(tmp_path / "bad.out")
    ok = cli(fine)
    assert ok.returncode == 0 and "skipped 1 malformed lines" in ok.stdout, ok.stderr
    assert cli(bad, "--max-malformed-fraction", "0.3").returncode == 0
    with pytest.raises(MalformedInputError) as err:  # the tokenizer trainer has the same limits
        train_tokenizer([str(bad)], 300, "bpe", str(tmp_path / "tok"), threads=1)
    assert str(err.value) == message and not (tmp_path / "tok.model").exists()
