"""Tokenizer training, corpus tokenization, and the training datasets built from the result.

Command lines: ``python -m data_prep.train_tokenizer`` and ``python -m data_prep.tokenize``.
For the trainer: ``DataConfig``, ``build_datasets``, ``micro_batches``, ``check_data_files``,
``check_tokenizer``, ``load_tokenizer`` (special token ids are documented in ``data_prep.tokenizer``).

The names load on first use: the package imports none of its modules itself, so ``python -m
data_prep.tokenize`` runs the one copy of its module (importing ``datasets`` here would import
``tokenize`` before runpy runs it, and a second copy with it), and the command lines do not import
megatron-core's dataset machinery when they do not need it.
"""
import importlib

_MODULES = {"DataConfig": "datasets", "build_datasets": "datasets", "check_data_files": "datasets",
            "check_tokenizer": "datasets", "micro_batches": "datasets", "load_tokenizer": "tokenizer",
            "SentencePieceTokenizer": "tokenizer", "PAD_ID": "tokenizer", "UNK_ID": "tokenizer",
            "BOS_ID": "tokenizer", "EOS_ID": "tokenizer"}
__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"data_prep.{_MODULES[name]}"), name)
