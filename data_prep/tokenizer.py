"""The SentencePiece tokenizer as the rest of the project sees it.

Special token ids are fixed for every model trained by ``data_prep.train_tokenizer``:

    0 <pad>   padding (never produced by encoding; megatron masks it out of the loss)
    1 <unk>   unknown (never produced either: byte fallback covers every character)
    2 <s>     beginning of sequence (not added by data_prep)
    3 </s>    end of document; ``tokenize --append-eod`` appends it to every document

followed by the 256 byte-fallback pieces ``<0x00>`` … ``<0xFF>`` (ids 4–259) and the learned pieces.
A model is identified by the SHA-256 of its ``.model`` file: datasets record it and training checks it.
"""
import hashlib

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in blocks so that large files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer:
    """A SentencePiece model plus the attributes megatron-core's GPTDataset reads.

    GPTDataset needs ``vocab_size``, ``eod`` and ``pad``, and puts ``unique_identifiers`` into the
    name of its index caches; we use the model's hash there, so a cache can never be reused with
    another tokenizer, while moving the model file does not invalidate it.
    """

    def __init__(self, path: str):
        self.path = path
        self.sha256 = file_sha256(path)
        self.processor = spm.SentencePieceProcessor(model_file=path)
        if self.processor.eos_id() < 0:
            raise ValueError(f"tokenizer {path} has no end-of-document piece </s>; "
                             "train it with `python -m data_prep.train_tokenizer`")
        self.unique_identifiers = {"class": type(self).__name__, "sha256": self.sha256}

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def eod(self) -> int:
        return self.processor.eos_id()

    @property
    def pad(self) -> int:
        return self.processor.pad_id()

    def tokenize(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def detokenize(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> SentencePieceTokenizer:
    """Load a SentencePiece ``.model`` file; a missing file is a clear error, not a C++ abort."""
    try:
        return SentencePieceTokenizer(path)
    except OSError as err:
        raise FileNotFoundError(f"cannot read tokenizer model {path!r}: {err}") from err
