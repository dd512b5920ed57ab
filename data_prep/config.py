"""The `data:` section of a training config, apart from the datasets: it loads without torch and
megatron-core, as the training config and ``python -m pretrain.train --help`` need."""
from dataclasses import dataclass


@dataclass
class DataConfig:
    """The `data:` section: the token files to train and validate on."""
    paths: list[str]                 # dataset prefixes written by python -m data_prep.tokenize (no .bin/.idx)
    weights: list[float] | None = None  # blend weights, one per path; null = by token count (every token equally often)
    split: str = "98,2,0"            # train,valid,test fractions of each dataset's documents (all train with valid_paths)
    tokenizer: str = ""              # the SentencePiece .model the data was tokenized with (checked by hash)
    cache_dir: str | None = None     # where the index caches go; null = index-cache in the first path's directory
    valid_paths: list[str] | None = None  # held-out prefixes to validate on (the corpus's valid shard), blended by size
