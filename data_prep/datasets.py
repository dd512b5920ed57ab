"""Training data for `pretrain`: megatron-core GPT datasets over tokenized prefixes, and their batches.

Samples are windows of ``seq_length + 1`` tokens cut from the concatenated documents (tokens = the
first ``seq_length``, labels = the last ``seq_length``), shuffled by megatron-core with the seed. The
index caches are built once: the builder builds them on global rank 0 while the other ranks wait at a
barrier, then load them. The sample order is a pure function of (data, split, seq_length, seed,
sample counts), so a run is resumed from one number, the consumed samples in its checkpoint.
"""
import os
import struct
import tempfile
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import (_INDEX_HEADER, DType, IndexedDataset, get_bin_path,
                                                     get_idx_path)

from data_prep.config import DataConfig
from data_prep.tokenize import read_sidecar
from data_prep.tokenizer import file_sha256, load_tokenizer

# megatron-core's .idx layout (its _IndexWriter / _IndexReader): magic, version 1, token dtype code,
# sequence count, document count; then int32 lengths and int64 byte pointers per sequence, and the
# int64 document index (first sequence of each document, then the sequence count).
IDX_HEADER = struct.Struct(f"<{len(_INDEX_HEADER)}sQBQQ")
IDX_VERSION = 1
CHECK_CHUNK = 1 << 22  # index entries checked at a time: bounded memory whatever the corpus size


def _all_paths(cfg: DataConfig) -> list[str]:
    return cfg.paths + (cfg.valid_paths or [])


def check_data_files(cfg: DataConfig) -> None:
    """Fail before training on missing or broken token files: megatron-core's reader stops at a bare
    assert on a corrupt index, and a truncated .bin only fails at its first batch, after the model and
    engine are built."""
    if not cfg.paths:
        raise ValueError("data.paths is empty: give at least one dataset prefix")
    missing = [p for p in _all_paths(cfg) if not IndexedDataset.exists(p)]
    if missing:
        raise FileNotFoundError(f"no .bin/.idx dataset at {', '.join(missing)}")
    for prefix in _all_paths(cfg):
        _check_indexed_dataset(get_idx_path(prefix), get_bin_path(prefix))


def _check_indexed_dataset(idx_path: str, bin_path: str) -> None:
    """Header, index layout, and that the .bin holds every sequence the index points to."""
    with open(idx_path, "rb") as f:
        header = f.read(IDX_HEADER.size)
    if len(header) < IDX_HEADER.size or not header.startswith(_INDEX_HEADER):
        raise ValueError(f"{idx_path} is not a megatron-core index (no MMIDIDX header)")
    _, version, code, n_seq, n_doc = IDX_HEADER.unpack(header)
    if version != IDX_VERSION:
        raise ValueError(f"{idx_path} has index version {version}; megatron-core reads version {IDX_VERSION}")
    try:
        itemsize = DType.size(code)
    except ValueError:
        raise ValueError(f"{idx_path} has unknown token dtype code {code}") from None
    idx_size, need = os.path.getsize(idx_path), IDX_HEADER.size + 12 * n_seq + 8 * n_doc
    if idx_size != need:
        raise ValueError(f"{idx_path} is {idx_size} bytes but its header ({n_seq} sequences, {n_doc} document "
                         f"index entries) needs {need}")
    index = np.memmap(idx_path, mode="r")
    lengths = np.frombuffer(index, np.int32, n_seq, IDX_HEADER.size)
    pointers = np.frombuffer(index, np.int64, n_seq, IDX_HEADER.size + 4 * n_seq)
    documents = np.frombuffer(index, np.int64, n_doc, IDX_HEADER.size + 12 * n_seq)
    if (n_doc == 0 or documents[0] != 0 or documents[-1] != n_seq
            or any((np.diff(documents[i:i + CHECK_CHUNK + 1]) < 0).any() for i in range(0, n_doc, CHECK_CHUNK))):
        raise ValueError(f"{idx_path}: its document index does not run in order from 0 to its {n_seq} "
                         "sequences (corrupt index?)")
    end = 0  # bytes of the .bin taken by the sequences so far: where the next one starts
    for i in range(0, n_seq, CHECK_CHUNK):
        nbytes = lengths[i:i + CHECK_CHUNK] * np.int64(itemsize)
        if (nbytes < 0).any() or not np.array_equal(pointers[i:i + CHECK_CHUNK], end + np.cumsum(nbytes) - nbytes):
            raise ValueError(f"{idx_path}: its sequence pointers do not follow its sequence lengths (corrupt index?)")
        end += int(nbytes.sum())
    bin_size = os.path.getsize(bin_path)
    if bin_size < end:
        raise ValueError(f"{bin_path} is {bin_size} bytes but its index needs {end} (truncated?)")


def check_tokenizer(cfg: DataConfig, vocab_size: int) -> None:
    """Fail before training if the data was tokenized with another tokenizer than ``cfg.tokenizer``,
    or the model's vocabulary (``vocab_size``) cannot hold the tokenizer's ids."""
    tok = load_tokenizer(cfg.tokenizer)
    for prefix in _all_paths(cfg):
        side = read_sidecar(prefix)
        if side["tokenizer_sha256"] != tok.sha256:
            raise ValueError(
                f"tokenizer mismatch: dataset {prefix} was tokenized with {side['tokenizer']} "
                f"(sha256 {side['tokenizer_sha256']}, vocab {side['vocab_size']}), but the config's "
                f"tokenizer is {cfg.tokenizer} (sha256 {tok.sha256}, vocab {tok.vocab_size})")
    if vocab_size < tok.vocab_size:
        raise ValueError(f"model vocab_size {vocab_size} is smaller than the vocabulary of tokenizer "
                         f"{cfg.tokenizer} ({tok.vocab_size} pieces)")


def _blend(paths: list[str], weights: list[float] | None) -> tuple[list[str], list[float] | None]:
    """The blend handed to megatron-core. A single dataset needs no weights; several get token-count
    weights by default, so that megatron samples them to any requested size (with no weights it would
    cap the blend at one epoch)."""
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"{len(weights)} blend weights for {len(paths)} dataset paths: {paths}")
    if weights is None and len(paths) > 1:
        weights = [float(read_sidecar(p)["tokens"]) for p in paths]
    return paths, weights


def _check_splits(cfg: DataConfig, config: GPTDatasetConfig) -> None:
    """megatron-core loops forever on a split with no documents; say which dataset is too small instead."""
    for prefix in cfg.paths:
        n = read_sidecar(prefix)["documents"]
        for i, bounds in enumerate(config.split_matrix):  # the same rounding as megatron-core's builder
            if bounds is not None and round(bounds[1] * n) - round(bounds[0] * n) == 0:
                raise ValueError(f"dataset {prefix} has {n} documents: split {cfg.split!r} leaves its "
                                 f"{['train', 'valid', 'test'][i]} part empty; change the split, "
                                 "add data, or set valid_paths")


@contextmanager
def _process_group():
    """megatron-core's BlendedDataset asks for the rank even when torch.distributed is not
    initialized; a lone process gets a one-rank group for the duration of the build."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def build_datasets(cfg: DataConfig, seq_length: int, seed: int, train_samples: int, valid_samples: int):
    """(train, valid) megatron-core datasets with at least the requested numbers of samples.

    Call it on every rank (it synchronizes with barriers when torch.distributed is initialized).
    valid is None when there is no validation data (valid fraction 0 and no ``valid_paths``).
    """
    check_data_files(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_tokenizer(cfg, tokenizer.vocab_size)
    blend = _blend(cfg.paths, cfg.weights)
    default_cache = os.path.join(os.path.dirname(os.path.abspath(cfg.paths[0])), "index-cache")
    common = dict(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
        path_to_cache=cfg.cache_dir or default_cache,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    if cfg.valid_paths:
        config = GPTDatasetConfig(blend_per_split=[blend, _blend(cfg.valid_paths, None), None], **common)
    else:
        config = GPTDatasetConfig(blend=blend, split=cfg.split, **common)
        _check_splits(cfg, config)
    with _process_group():
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    return train, valid


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[dict]:
    """This data-parallel rank's micro-batches, starting after ``consumed_samples`` global samples.

    The global order is the dataset's order whatever ``dp_size`` is: each step takes the next
    ``micro_batch_size * dp_size`` samples and gives rank r the r-th contiguous slice of them. TP and
    PP ranks of one data-parallel group pass the same dp_rank and so get the same batches. A resumed
    run passes the consumed samples of its checkpoint and continues with exactly the next sample,
    even with another dp_size. Stops when fewer than one global step of samples is left.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    step = micro_batch_size * dp_size
    for first in range(consumed_samples, len(dataset) - step + 1, step):
        start = first + dp_rank * micro_batch_size
        samples = [dataset[i] for i in range(start, start + micro_batch_size)]
        yield {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels")}
