"""Streaming shards: the rank/worker split, the shuffle buffer, resampled epochs and the exact resume position.

Samples are caption-only (tiny and fast); each item's ``index`` is the CRC-32 of its source, so ``keys`` maps a
batch back to the sample keys it holds.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codebridge.config import Config, ConfigError, DataConfig, PrepConfig, TrainConfig
from codebridge.data.dataset import SampleDataset
from codebridge.data.modalities.text import Tokenizer
from codebridge.data.preprocess import Preprocessors
from codebridge.data.shard import write_shards
from codebridge.data.stream import ShardStream, StreamLoader, shuffled, training_stream
from codebridge.train import train
from codebridge.train.checkpoint import CHECKPOINTS
from test_sources import write_tar
from test_trainer import one_thread, read_metrics, shapes, tiny_config  # noqa: F401 (fixtures)

SIZES = (7, 5, 9, 6, 8)  # samples per shard: uneven, so workers run out at different times


def make_shards(folder: Path, sizes: tuple[int, ...] = SIZES) -> tuple[list[str], dict[int, str]]:
    """Shards of caption-only samples, and index (CRC-32 of the source) -> key."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, keys = [], {}
    for s, size in enumerate(sizes):
        path = folder / f"shard-{s:05d}.tar"
        names = [f"s{s}-{i:02d}" for i in range(size)]
        write_tar(path, [(f"{name}.txt", f"caption {name}".encode()) for name in names])
        shards.append(str(path))
        keys |= {zlib.crc32(f"{path}:{name}".encode()): name for name in names}
    return shards, keys


@pytest.fixture(scope="module")
def prep() -> Preprocessors:
    return Preprocessors(PrepConfig(), Tokenizer.train([f"caption s{i}" for i in range(10)], PrepConfig().text))


def stream_loader(
    shards: list[str],
    prep: Preprocessors,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 3,
    buffer: int = 4,
    saved: dict | None = None,
) -> StreamLoader:
    dataset = SampleDataset([], ["text"], prep, train=True)
    stream = ShardStream(
        shards, dataset, workers=max(workers, 1), rank=rank, world_size=world_size, seed=3, buffer=buffer
    )
    return StreamLoader(stream, batch_size, workers, drop_last=False, saved=saved)


def keys_of(batch: dict, keys: dict[int, str]) -> list[str]:
    return [keys[int(i) & 0xFFFFFFFF] for i in batch["index"]]


def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(tmp_path: Path, prep: Preprocessors) -> None:
    shards, keys = make_shards(tmp_path, (3, 4, 2, 5, 3, 4))
    loaders = [stream_loader(shards, prep, workers=2, rank=r, world_size=2) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = [key for loader in loaders for batch in loader for key in keys_of(batch, keys)]
        assert sorted(seen) == sorted(keys.values()), f"epoch {epoch}: a sample was missed or seen twice"
        assert all(loader.epoch == epoch for loader in loaders)
        orders.append(seen)
    assert orders[0] != orders[1]  # shard order and buffer reshuffled per epoch


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path: Path, prep: Preprocessors) -> None:
    shards, _ = make_shards(tmp_path, (2, 2, 2))
    with pytest.raises(ConfigError, match=r"3 shard\(s\) cannot be split over 2 rank\(s\) x 2 DataLoader worker"):
        stream_loader(shards, prep, workers=2, world_size=2)


class Counted:
    """An iterator that counts what has been taken from it."""

    def __init__(self, n: int) -> None:
        self.items, self.taken = iter(range(n)), 0

    def __iter__(self) -> Iterator[int]:
        for item in self.items:
            self.taken += 1
            yield item


def test_shuffle_buffer_is_seeded_and_holds_at_most_its_size() -> None:
    first = list(shuffled(range(50), 8, random.Random(1)))
    assert first == list(shuffled(range(50), 8, random.Random(1))) != list(shuffled(range(50), 8, random.Random(2)))
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(shuffled(range(5), 1, random.Random(1))) == list(range(5))
    source = Counted(1000)
    for yielded, _ in enumerate(shuffled(source, 8, random.Random(0)), 1):
        assert source.taken - yielded <= 8  # held now: the buffer (the item just read included)


def test_the_stream_reads_lazily(tmp_path: Path, prep: Preprocessors) -> None:
    """Memory is bounded by the buffer: the first item is handed out after reading buffer + 1 samples at most."""
    shards, _ = make_shards(tmp_path, (40, 40))
    dataset = SampleDataset([], ["text"], prep, train=True)
    stream = ShardStream(shards, dataset, workers=1, buffer=5)
    read = Counted(0)
    records = stream.records

    def counting(epoch: int, worker: int, skip: int) -> Iterator:
        for record in records(epoch, worker, skip):
            read.taken += 1
            yield record

    stream.records = counting  # type: ignore[method-assign]
    items = iter(stream)
    for n in range(1, 30):
        next(items)
        assert read.taken <= n + 5


def test_resampled_epochs_have_the_set_length(tmp_path: Path, prep: Preprocessors) -> None:
    shards, _ = make_shards(tmp_path, (3, 4))  # fewer shards than readers is fine when drawing with replacement
    cfg = Config(
        data=DataConfig(train=str(tmp_path), modalities=["text"], num_workers=2, resampled=True, epoch_samples=40),
        train=TrainConfig(batch_size=4),
    )
    loaders = [training_stream(cfg, shards, prep, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        counts = [sum(len(batch["index"]) for batch in loader) for loader in loaders]
        assert counts == [20, 20] and loaders[0].epoch == epoch  # 40 samples per epoch over 2 ranks


def run_batches(loader: StreamLoader, n: int, keys: dict[int, str]) -> list[list[str]]:
    batches: list[list[str]] = []
    while len(batches) < n:
        for batch in loader:
            batches.append(keys_of(batch, keys))
            if len(batches) == n:
                break
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_sees_exactly_the_uninterrupted_batches(
    tmp_path: Path, prep: Preprocessors, workers: int
) -> None:
    shards, keys = make_shards(tmp_path)
    whole = run_batches(stream_loader(shards, prep, workers), 30, keys)  # a bit over two epochs
    for stop in sorted(random.Random(workers).sample(range(1, 29), 4)):
        first = stream_loader(shards, prep, workers)
        done = run_batches(first, stop, keys)
        resumed = stream_loader(shards, prep, workers, saved=first.state())
        assert done + run_batches(resumed, 30 - stop, keys) == whole, f"resumed after batch {stop}"


def test_a_resume_with_other_workers_is_refused(tmp_path: Path, prep: Preprocessors) -> None:
    shards, _ = make_shards(tmp_path)
    with pytest.raises(ConfigError, match=r"data.num_workers=2 but this run has 1"):
        stream_loader(shards, prep, 1, saved={"epoch": 0, "consumed": [3, 3], "next_worker": 0})


def test_a_resumed_resampled_stream_ends_its_epoch_at_the_same_batch(tmp_path: Path, prep: Preprocessors) -> None:
    shards, keys = make_shards(tmp_path, (3, 4))
    cfg = Config(
        data=DataConfig(train=str(tmp_path), modalities=["text"], num_workers=2, resampled=True, epoch_samples=36),
        train=TrainConfig(batch_size=4),
    )
    first = training_stream(cfg, shards, prep)
    run_batches(first, 4, keys)
    resumed = [training_stream(cfg, shards, prep, saved=first.state()) for _ in range(2)]
    rest = [[keys_of(batch, keys) for batch in loader] for loader in resumed]
    assert len(rest[0]) == 9 - 4 and rest[0] == rest[1]  # the epoch's remaining batches, drawn reproducibly
    assert sum(1 for _ in resumed[0]) == 9 and resumed[0].epoch == 1


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_training_on_shards_resumes_where_it_stopped(
    shapes: dict[str, Path],  # noqa: F811 (test_trainer's shapes data set)
    tmp_path: Path,
    mode: str,
) -> None:
    """A run on streamed shards (2 workers), resumed in a fresh folder from a checkpoint taken mid-epoch at a
    random step (what a kill leaves), ends with the uninterrupted run's weights and losses (exact mode), or with
    its steps and epoch boundaries (resampled)."""
    shards = tmp_path / "shards"
    write_shards(str(shapes["train"]), shards, DataConfig(), samples_per_shard=13)  # 96 samples: 8 uneven shards
    overrides = [
        f"data.train={shards}",
        "data.num_workers=2",
        "data.shuffle_buffer=8",
        "train.steps=14",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=0",
    ]
    if mode == "resampled":
        overrides += ["data.resampled=true", "data.epoch_samples=80"]
    straight = train(tiny_config(shapes, tmp_path / "straight", *overrides, "data.val=null"))
    step = random.Random(mode).randrange(2, 13)
    resumed = tmp_path / "resumed"
    checkpoint = straight / CHECKPOINTS / f"step_{step:06d}"
    train(tiny_config(shapes, resumed, *overrides, "data.val=null"), resume=str(checkpoint))

    def numbers(run: Path) -> list[tuple]:
        return [(r["step"], r["epoch"], r["loss"] if mode == "exact" else None) for r in read_metrics(run)]

    assert numbers(resumed) == numbers(straight)[step:], f"resumed at step {step}"
    if mode == "exact":  # resampled: the same steps and epochs, a new draw (samples drawn with replacement)
        a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_decoded_cache_serves_later_epochs_without_changing_a_batch(tmp_path: Path, prep: Preprocessors) -> None:
    shards, keys = make_shards(tmp_path)
    data = DataConfig(train=str(tmp_path), modalities=["text"], cache_mb=1.0)
    cfg = Config(data=data, train=TrainConfig(batch_size=4))
    plain, cached = training_stream(cfg, shards, prep), training_stream(cfg, shards, prep)
    plain.stream.prep.cache = type(cached.stream.prep.cache)(0.0)  # the same loader without a cache
    for epoch in range(3):
        for a, b in zip(plain, cached, strict=True):
            assert keys_of(a, keys) == keys_of(b, keys)
            assert all(torch.equal(a["text"][k], b["text"][k]) for k in a["text"]), f"epoch {epoch}"
        assert len(cached.stream.prep.cache) == sum(SIZES)  # in-process: every sample read, each under its own key
    assert len(plain.stream.prep.cache) == 0
