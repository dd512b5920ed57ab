"""Stream documents out of raw text files, skipping and counting malformed input.

Formats, chosen by the file name (after an optional ``.gz`` or ``.xz`` suffix):

- ``.jsonl`` / ``.json``: JSON lines, one document per line, its text under a key (default ``text``).
  A line that is not UTF-8, not a JSON object, or lacks a string under the key is *malformed*.
- ``.txt``: plain text; documents are blocks separated by one or more blank (whitespace-only) lines.
  A document's text is its lines as in the file, without the last line's newline. A block with
  a non-UTF-8 line is malformed (reported at that line).

Empty documents are skipped and counted apart. Files are read line by line, never whole. Training
readers refuse files under the project's ``data/eval/`` (evaluation text must never be trained on);
post-training reads its calibration and evaluation documents through the same reader
(``training=False``), with no malformed line allowed.
"""
import gzip
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

EVAL_DIR = Path(__file__).resolve().parent.parent / "data" / "eval"
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
COMPRESSORS = {".gz": gzip.open, ".xz": lzma.open}  # both also take an open binary file


class MalformedInputError(ValueError):
    """Too many malformed lines: the input is probably not what the user meant to feed."""


@dataclass
class MalformedLog:
    """Counts malformed lines over a whole run and fails once there are more than ``limit``, or at the
    end (``check_fraction``) when they are more than ``fraction`` of the input's records."""
    limit: int
    fraction: float = 1.0
    keep: int = 5
    count: int = 0
    first: list[tuple[str, int, str]] = field(default_factory=list)  # (path, line number, reason)

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:  # e.g. 5 meant as 5 %
            raise ValueError(f"the malformed-line fraction limit must be in [0, 1], got {self.fraction}")

    def add(self, path: str, line_no: int, reason: str) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append((path, line_no, reason))
        if self.count > self.limit:
            raise MalformedInputError(
                f"{self.count} malformed lines, more than the limit of {self.limit} "
                f"(first: {describe_malformed(self.first)}); "
                "fix the input, or raise the limit if skipping them is intended")

    def check_fraction(self, records: int) -> None:
        """Called once the whole input is read: only then is the fraction known (a fraction judged
        on the first lines would fail a corpus whose bad lines happen to come first)."""
        if self.count > self.fraction * records:
            raise MalformedInputError(
                f"{self.count} malformed lines of {records} input records ({100 * self.count / records:.1f}%), "
                f"more than the limit of {100 * self.fraction:g}% (first: {describe_malformed(self.first)}); "
                "fix the input, or raise the limit if skipping them is intended")


def add_malformed_options(parser) -> None:
    """The ``--max-malformed*`` limits of the commands that read raw text (their ``MalformedLog``)."""
    parser.add_argument("--max-malformed", type=int, default=100,
                        help="skip up to this many malformed lines; fail when there are more")
    parser.add_argument("--max-malformed-fraction", type=float, default=0.01,
                        help="also fail when more than this fraction of the input records (JSON lines, text "
                             "blocks) is malformed; judged once the whole input is read (0.01 = 1%%)")


def describe_malformed(entries) -> str:
    """'path:line reason; ...' for (path, line number, reason) entries."""
    return "; ".join(f"{path}:{line} {reason}" for path, line, reason in entries)


def input_format(path: str) -> str:
    """'json' or 'text', from the file name; any other name is a clear error."""
    name = path[: -len(ext)] if (ext := os.path.splitext(path)[1]) in COMPRESSORS else path
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(f"{path}: unknown input format; expected one of "
                     f"{', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)}, optionally followed by .gz or .xz")


def check_not_eval(path: str) -> None:
    if Path(path).resolve().is_relative_to(EVAL_DIR):
        raise ValueError(f"{path} is evaluation data (under {EVAL_DIR}); it must never be used for training")


class DocumentReader:
    """Iterates over the documents of one file; records per-file counts and the compressed read position."""

    def __init__(self, path: str, malformed: MalformedLog, json_key: str = "text", training: bool = True):
        if training:
            check_not_eval(path)
        self.path, self.json_key, self.log = path, json_key, malformed
        self.format = input_format(path)
        self.size = os.path.getsize(path)
        self.documents = self.empty = self.malformed = 0
        self._raw: BinaryIO | None = None

    @property
    def records(self) -> int:
        """JSON lines or text blocks read, good, empty or malformed: what the malformed fraction is of."""
        return self.documents + self.empty + self.malformed

    @property
    def position(self) -> int:
        """Bytes of the file (compressed, if it is) read so far: progress and ETA are based on it."""
        if self._raw is None:
            return 0
        return self.size if self._raw.closed else self._raw.tell()

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as raw:
            self._raw = raw
            compressor = COMPRESSORS.get(os.path.splitext(self.path)[1])
            with compressor(raw) if compressor else raw as lines:
                parse = self._json_documents if self.format == "json" else self._text_documents
                for text in parse(lines):
                    if text.strip():
                        self.documents += 1
                        yield text
                    else:
                        self.empty += 1

    def _bad(self, line_no: int, reason: str) -> None:
        self.malformed += 1
        self.log.add(self.path, line_no, reason)

    def _json_documents(self, lines) -> Iterator[str]:
        for line_no, line in enumerate(lines, 1):
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                self._bad(line_no, "is not UTF-8")
                continue
            except json.JSONDecodeError as err:
                if line.strip():  # blank lines are allowed between records
                    self._bad(line_no, f"is not JSON ({err.msg})")
                continue
            text = record.get(self.json_key) if isinstance(record, dict) else None
            if isinstance(text, str):
                yield text
            else:
                self._bad(line_no, f"has no string under key {self.json_key!r}")

    def _text_documents(self, lines) -> Iterator[str]:
        block, bad_line = [], None
        for line_no, line in enumerate(lines, 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                bad_line = bad_line or line_no
                continue
            if line.strip():
                block.append(line)
                continue
            yield from self._end_block(block, bad_line)
            block, bad_line = [], None
        yield from self._end_block(block, bad_line)

    def _end_block(self, block: list[str], bad_line: int | None) -> Iterator[str]:
        if bad_line is not None:
            self._bad(bad_line, "is not UTF-8 (its whole block is skipped)")
        elif block:
            text = "".join(block)
            yield text[:-1] if text.endswith("\n") else text
