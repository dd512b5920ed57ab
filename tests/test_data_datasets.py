"""Training datasets: determinism, data-parallel order, resume, blending, tokenizer checks, broken files."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep.datasets import DataConfig, build_datasets, check_data_files, check_tokenizer, micro_batches
from data_prep.tokenize import read_sidecar, tokenize_files
from tests.data_utils import ENV, ROOT, tiny_data, train_args
from tests.dist_utils import run_distributed
from tests.test_data_tokenize import DEMO, REPO, train_small_tokenizer

SEQ, SEED = 64, 1234
VALID = str(REPO / "data" / "demo" / "valid.jsonl.xz")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and the demo datasets 'wiki', 'gut' and 'valid' tokenized with it."""
    root = tmp_path_factory.mktemp("data")
    tokenizer = train_small_tokenizer(root)
    prefixes = {}
    for name, path in [("wiki", DEMO[0]), ("gut", DEMO[1]), ("valid", VALID)]:
        prefixes[name] = str(root / name)
        tokenize_files([path], tokenizer, prefixes[name], append_eod=True)
    return tokenizer, prefixes, root


def config(data, *names, **kw) -> DataConfig:
    tokenizer, prefixes, root = data
    kw.setdefault("cache_dir", str(root / "cache"))
    return DataConfig(paths=[prefixes[n] for n in names], tokenizer=tokenizer, **kw)


def all_batches(dataset, consumed=0, mbs=2, dp=1) -> list[torch.Tensor]:
    """The global sequence of samples' tokens as the dp ranks see it, step by step."""
    per_rank = [list(micro_batches(dataset, consumed, mbs, r, dp)) for r in range(dp)]
    return [b["tokens"] for step in zip(*per_rank) for b in step]


def token_stream(prefix: str, doc_order) -> np.ndarray:
    """The dataset's documents concatenated in the given order."""
    ds = IndexedDataset(prefix)
    return np.concatenate([ds[int(d)] for d in doc_order])


def test_samples_are_shifted_windows_of_the_document_stream(data):
    train, valid = build_datasets(config(data, "wiki"), SEQ, SEED, 100, 10)
    assert len(train) >= 100 and len(valid) >= 10
    stream = token_stream(data[1]["wiki"], train.document_index).astype(np.int64).tobytes()
    for batch in list(micro_batches(train, 0, 4, 0, 1))[:5]:
        tokens, labels = batch["tokens"], batch["labels"]
        assert tokens.shape == labels.shape == (4, SEQ) and tokens.dtype == torch.long
        assert torch.equal(tokens[:, 1:], labels[:, :-1])
        for t, l in zip(tokens, labels):
            window = torch.cat([t, l[-1:]]).numpy().tobytes()
            assert stream.find(window) % 8 == 0  # found (not -1) at a token boundary


def test_same_seed_same_batches_and_caches_are_reused(data, tmp_path):
    def batches(cache, seed):
        cfg = config(data, "wiki", cache_dir=str(tmp_path / cache))
        return all_batches(build_datasets(cfg, SEQ, seed, 64, 8)[0])

    first, again, other = batches("a", SEED), batches("b", SEED), batches("c", SEED + 1)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))

    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    build_datasets(config(data, "wiki", cache_dir=str(tmp_path / "a")), SEQ, SEED, 64, 8)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == mtimes  # loaded, not rebuilt


def global_order(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["tokens"] for i in range(len(dataset))])


def test_global_order_does_not_depend_on_dp_size(data):
    train, _ = build_datasets(config(data, "wiki"), SEQ, SEED, 96, 8)
    order = global_order(train)
    for mbs, dp in [(4, 1), (2, 2), (1, 4), (3, 2)]:
        samples = torch.cat(all_batches(train, mbs=mbs, dp=dp))
        assert len(samples) == len(order) // (mbs * dp) * (mbs * dp)  # only a last partial step is dropped
        assert torch.equal(samples, order[:len(samples)])


def test_resume_continues_with_exactly_the_next_sample(data):
    train, _ = build_datasets(config(data, "wiki"), SEQ, SEED, 96, 8)
    order = global_order(train)
    k_steps, mbs, dp = 5, 2, 2  # the first run: DP=2 for 5 steps, then preempted
    ranks = [micro_batches(train, 0, mbs, r, dp) for r in range(dp)]
    first = torch.cat([next(it)["tokens"] for _ in range(k_steps) for it in ranks])
    consumed = k_steps * mbs * dp  # what the checkpoint records
    assert torch.equal(first, order[:consumed])
    for resumed_mbs, resumed_dp in [(2, 2), (4, 1), (1, 3)]:  # resumed with the same or another DP size
        resumed = torch.cat(all_batches(train, consumed, resumed_mbs, resumed_dp))
        assert torch.equal(resumed, order[consumed:consumed + len(resumed)])  # no repeat, no skip
        assert len(order) - consumed - len(resumed) < resumed_mbs * resumed_dp


def wiki_share(dataset) -> float:
    return float(np.mean([dataset[i]["dataset_id"] == 0 for i in range(len(dataset))]))


def test_blend_follows_weights_or_token_counts(data):
    cfg = config(data, "wiki", "gut", weights=[0.75, 0.25], split="100,0,0")
    train, valid = build_datasets(cfg, SEQ, SEED, 400, 0)
    assert valid is None and len(train) >= 400 and abs(wiki_share(train) - 0.75) < 0.01

    tokens = [read_sidecar(data[1][name])["tokens"] for name in ("wiki", "gut")]
    train, _ = build_datasets(config(data, "wiki", "gut", split="100,0,0"), SEQ, SEED, 400, 0)
    assert len(train) >= 400 and abs(wiki_share(train) - tokens[0] / sum(tokens)) < 0.01


def test_valid_paths_hold_out_a_separate_dataset(data):
    train, valid = build_datasets(config(data, "wiki", valid_paths=[data[1]["valid"]]), SEQ, SEED, 32, 16)
    assert len(train.indices) == len(train.dataset)  # all of 'wiki' is training data
    stream = token_stream(data[1]["valid"], valid.document_index).astype(np.int64).tobytes()
    for batch in list(micro_batches(valid, 0, 4, 0, 1))[:3]:
        for t, l in zip(batch["tokens"], batch["labels"]):
            assert stream.find(torch.cat([t, l[-1:]]).numpy().tobytes()) % 8 == 0


def test_tokenizer_mismatch_is_a_clear_error_naming_both(data, tmp_path):
    other = train_small_tokenizer(tmp_path, vocab_size=800)
    cfg = config(data, "wiki")
    cfg.tokenizer = other
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        check_tokenizer(cfg, 800)
    assert data[0] in str(err.value) and other in str(err.value)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        build_datasets(cfg, SEQ, SEED, 10, 0)
    with pytest.raises(ValueError, match=r"model vocab_size 999 is smaller .* \(1000 pieces\)"):
        check_tokenizer(config(data, "wiki"), 999)
    check_tokenizer(config(data, "wiki"), 1024)  # a padded model vocabulary is fine


def test_too_small_split_is_a_clear_error(data):
    with pytest.raises(ValueError, match=r"has 2 documents: split '98,2,0' leaves its valid part empty"):
        build_datasets(config(data, "gut"), SEQ, SEED, 10, 2)


def _dp_rank_batches(cfg: DataConfig) -> tuple[list[torch.Tensor], list[str]]:
    dist.init_process_group("gloo")
    train, _ = build_datasets(cfg, SEQ, SEED, 64, 8)
    batches = [b["tokens"] for b in micro_batches(train, 0, 2, dist.get_rank(), dist.get_world_size())]
    return batches, sorted(os.listdir(cfg.cache_dir))


def test_two_ranks_build_caches_once_and_split_each_global_batch(data, tmp_path):
    cfg = config(data, "wiki", cache_dir=str(tmp_path / "cache"))
    (rank0, files0), (rank1, files1) = run_distributed(_dp_rank_batches, 2, cfg)
    assert files0 == files1 and sum(f.endswith("description.txt") for f in files0) == 2  # train + valid
    train, _ = build_datasets(cfg, SEQ, SEED, 64, 8)  # single process, DP=1, same caches
    expected = all_batches(train, mbs=4, dp=1)
    assert len(rank0) == len(rank1) == len(expected)
    for mine0, mine1, whole in zip(rank0, rank1, expected):
        assert torch.equal(torch.cat([mine0, mine1]), whole)


def copy_dataset(prefix: str, directory) -> str:
    for ext in ("bin", "idx", "json"):
        shutil.copy(f"{prefix}.{ext}", directory / f"train.{ext}")
    return str(directory / "train")


def truncate_bin(prefix: str) -> str:
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size // 2)
    return f"{prefix}.bin is {size // 2} bytes but its index needs {size} (truncated?)"


def randomize_idx_body(prefix: str) -> str:
    """Random bytes after the 34-byte header, the file size kept; the .bin stays whole."""
    size = os.path.getsize(prefix + ".idx")
    with open(prefix + ".idx", "r+b") as f:
        f.seek(34)
        f.write(np.random.default_rng(0).bytes(size - 34))
    n = read_sidecar(prefix)["documents"]
    return f"{prefix}.idx: its document index does not run in order from 0 to its {n} sequences (corrupt index?)"


def break_magic(prefix: str) -> str:
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"MMIDIDY")
    return f"{prefix}.idx is not a megatron-core index (no MMIDIDX header)"


@pytest.mark.parametrize("damage", [truncate_bin, randomize_idx_body, break_magic])
def test_broken_token_files_are_refused_in_one_line_before_any_model(tmp_path_factory, tmp_path, damage):
    tiny = tiny_data(tmp_path_factory)
    prefix = copy_dataset(f"{tiny}/train", tmp_path)
    message = damage(prefix)
    args = train_args(tiny, str(tmp_path / "run"), "--data.paths", f"[{prefix}]")
    run = subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stderr) == (2, f"data error: {message}\n"), run.stdout
    assert "parameters on this rank" not in run.stdout  # refused before distributed init and the model


def test_index_layout_is_checked_but_token_values_are_not(data, tmp_path):
    prefix = copy_dataset(data[1]["wiki"], tmp_path)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "wb") as f:  # same size, any tokens: only training could tell
        f.write(np.random.default_rng(0).bytes(size))
    check_data_files(DataConfig(paths=[prefix]))
    n = read_sidecar(prefix)["documents"]
    with open(prefix + ".idx", "r+b") as f:  # the second sequence's pointer: 2 bytes into the first
        f.seek(34 + 4 * n + 8)
        f.write(np.int64(2).tobytes())
    with pytest.raises(ValueError) as err:
        check_data_files(DataConfig(paths=[prefix]))
    assert str(err.value) == f"{prefix}.idx: its sequence pointers do not follow its sequence lengths (corrupt index?)"
    with open(prefix + ".idx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError) as err:
        build_datasets(DataConfig(paths=[prefix], tokenizer=data[0]), SEQ, SEED, 10, 0)
    assert str(err.value) == (f"{prefix}.idx is {34 + 20 * n + 9} bytes but its header ({n} sequences, "
                              f"{n + 1} document index entries) needs {34 + 20 * n + 8}")
