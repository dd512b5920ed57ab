"""The `data:` section of a training config, apart from the datasets: it loads without torch and
megatron-core, as the training config and ``python -m pretrain.train --help`` need."""
from dataclasses import dataclass


@dataclass
class DataConfig:
    """The ``data:`` section of the training YAML."""

    paths: list[str]
    """Dataset prefixes written by ``python -m data_prep.tokenize`` (without .bin/.idx/.json)."""
    weights: list[float] | None = None
    """Blend weights, one per path, normalized to sum 1. None: proportional to each dataset's token
    count, i.e. every token is seen equally often."""
    split: str = "98,2,0"
    """train,valid,test fractions of each dataset's documents (contiguous ranges, in file order).
    Ignored for validation when ``valid_paths`` is set (then all of ``paths`` is training data)."""
    tokenizer: str = ""
    """Path of the SentencePiece .model the data must have been tokenized with (checked by hash)."""
    cache_dir: str | None = None
    """Where the index caches go; default ``<directory of the first path>/index-cache``."""
    valid_paths: list[str] | None = None
    """Held-out dataset prefixes for validation (e.g. the corpus's valid shard), blended by size."""
