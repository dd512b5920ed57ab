"""Tokenizer training, corpus tokenization, and the training datasets built from the result.

Command lines: ``python -m data_prep.train_tokenizer`` and ``python -m data_prep.tokenize``.
For the trainer: ``data_prep.config.DataConfig``; ``data_prep.datasets`` (``build_datasets``,
``micro_batches``, ``check_data_files``, ``check_tokenizer``); ``data_prep.tokenizer``
(``load_tokenizer``; special token ids are documented there). Nothing is imported here, so
``data_prep.config`` loads without torch.
"""
