"""Tokenizer training, corpus tokenization, and the training datasets built from the result.

Command lines: ``python -m data_prep.train_tokenizer`` and ``python -m data_prep.tokenize``.
For the trainer: ``DataConfig``, ``build_datasets``, ``micro_batches``, ``check_data_files``,
``check_tokenizer``, ``load_tokenizer`` (special token ids are documented in ``data_prep.tokenizer``).
"""
from data_prep.datasets import DataConfig, build_datasets, check_data_files, check_tokenizer, micro_batches
from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentencePieceTokenizer, load_tokenizer

__all__ = ["DataConfig", "build_datasets", "check_data_files", "check_tokenizer", "micro_batches", "load_tokenizer",
           "SentencePieceTokenizer", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]
