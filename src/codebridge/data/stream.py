"""Training on WebDataset shards without holding them: an ``IterableDataset`` that streams samples, and its loader.

Split: rank r's logical worker w of W reads ``order[r*W + w :: world*W]`` of the epoch's shard order (a permutation
seeded by (seed, epoch)); its samples pass an in-memory shuffle buffer of ``data.shuffle_buffer`` samples seeded by
(seed, epoch, rank, w). Memory is the buffer plus one sample per worker, whatever the data size.

Resume (``StreamLoader.state``): per rank, the epoch, the samples each logical worker has handed out, and the
worker whose batch comes next. A resumed worker replays its (deterministic) stream and drops what was consumed
without decoding it, and the DataLoader's workers are rotated so the next batch comes from the same worker as in
the uninterrupted run: the resumed run sees exactly the batches the uninterrupted one would have.

``resampled``: each worker draws shards with replacement (all shards, seeded by (seed, epoch, rank, worker, samples
consumed)), endlessly, and an epoch is ``data.epoch_samples`` samples over all ranks. A resume continues the epoch
at the right batch with a draw seeded by where it stopped (samples drawn with replacement have no order to replay).
"""

from __future__ import annotations

import itertools
import logging
import random
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from codebridge.config import Config, ConfigError
from codebridge.data.dataset import (
    Item,
    SampleDataset,
    _Bad,
    _collate_keeping_bad,
    derive_seed,
    loader_options,
    with_hint,
)
from codebridge.data.preprocess import Preprocessors
from codebridge.data.sample import BadSampleError, Sample
from codebridge.data.sources.spec import RowError
from codebridge.data.sources.webdataset import read_shard

logger = logging.getLogger(__name__)

T = TypeVar("T")
Element = tuple[int, int, Item | _Bad]  # (logical worker, its sample count after this one, item or why it is bad)


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a random order drawn through a buffer of ``size`` (WebDataset's shuffle): never more than
    ``size`` items held besides the one just read; ``size`` <= 1 keeps the order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size - 1:
            buffer.append(item)
            continue
        buffer.append(item)
        pick = rng.randrange(len(buffer))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class StreamPosition:
    """Where a rank's stream stands: enough to continue it exactly (see the module docstring)."""

    epoch: int = 0
    consumed: list[int] = field(default_factory=list)  # samples handed out per logical worker in this epoch
    next_worker: int = 0  # logical worker whose batch comes next

    @classmethod
    def start(cls, workers: int, saved: dict[str, Any] | None) -> StreamPosition:
        if not saved:
            return cls(consumed=[0] * workers)
        position = cls(**saved)
        if len(position.consumed) != workers:
            raise ConfigError(
                f"the checkpoint's data position was written with data.num_workers={len(position.consumed)} "
                f"but this run has {workers}; a streamed resume needs the same data.num_workers "
                f"(--set data.num_workers={len(position.consumed)})"
            )
        return position


class ShardStream(IterableDataset):
    """This rank's samples of ``shards`` for ``epoch``, preprocessed by ``prep`` (a ``SampleDataset`` without
    samples: it decodes, augments, counts bad samples and, with ``data.cache_mb``, keeps what it decoded so a
    later epoch that meets the sample in the same process skips decoding); see the module docstring."""

    def __init__(
        self,
        shards: list[str],
        prep: SampleDataset,
        *,
        workers: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        buffer: int = 0,
        quota: list[int] | None = None,
        name: str = "the shards",
    ) -> None:
        readers = world_size * workers
        if quota is None and len(shards) < readers:
            raise ConfigError(
                f"{name}: {len(shards)} shard(s) cannot be split over {world_size} rank(s) x {workers} DataLoader "
                f"worker(s) = {readers} readers, each needs a shard; lower data.num_workers (e.g. --set "
                f"data.num_workers={max(len(shards) // world_size, 1) if len(shards) >= world_size else 0}), "
                f"re-shard into at least {readers} shards (codebridge data shard SPEC OUT --samples-per-shard N), "
                "or use --set data.resampled=true"
            )
        self.shards, self.prep, self.workers = shards, prep, workers
        self.rank, self.world_size, self.seed, self.shuffle, self.buffer = rank, world_size, seed, shuffle, buffer
        self.quota = quota  # resampled: samples each logical worker hands out per epoch
        self.position = StreamPosition.start(workers, None)  # set by the loader before each epoch
        self.rotation = 0  # DataLoader worker i plays logical worker (i + rotation) % workers

    def worker_shards(self, epoch: int, worker: int) -> list[str]:
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
        ordered = [self.shards[int(i)] for i in order] if self.shuffle else self.shards
        return ordered[self.rank * self.workers + worker :: self.world_size * self.workers]

    def records(self, epoch: int, worker: int, skip: int) -> Iterator[tuple[str, Sample | RowError]]:
        """The worker's (source, sample or error) stream before the shuffle buffer."""
        if self.quota is None:
            for shard in self.worker_shards(epoch, worker):
                yield from read_shard(Path(shard))
            return
        draw = random.Random(derive_seed(self.seed, epoch, self.rank, worker, skip))
        while True:
            yield from read_shard(Path(draw.choice(self.shards)))

    def elements(self, epoch: int, worker: int, skip: int) -> Iterator[Element]:
        """(worker, count, item) for each sample after the first ``skip`` (those are not decoded)."""
        rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, skip if self.quota else 0, 1))
        stream = shuffled(self.records(epoch, worker, skip), self.buffer, rng)
        count = skip
        if self.quota is None:
            stream = itertools.islice(stream, skip, None)  # replayed, not decoded
        else:
            stream = itertools.islice(stream, self.quota[worker] - skip)
        for source, found in stream:
            count += 1
            yield worker, count, self._item(source, found, epoch)

    def _item(self, source: str, found: Sample | RowError, epoch: int) -> Item | _Bad:
        if isinstance(found, RowError):
            return _Bad(source, found.reason)
        try:  # the per-sample randomness follows the sample, not its position in the stream
            return self.prep.prepare(found, zlib.crc32(source.encode()), epoch)
        except BadSampleError as err:
            return _Bad(err.source, err.reason)

    def __iter__(self) -> Iterator[Element]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.workers
        return self.elements(self.position.epoch, worker, self.position.consumed[worker])


def _collate_stream(elements: list[Element]) -> tuple[dict[str, Any] | None, list[_Bad], int, int]:
    """(batch, bad samples, worker, its count after the batch): a batch comes from one worker's consecutive items."""
    batch, bad = _collate_keeping_bad([item for _, _, item in elements])
    return batch, bad, elements[-1][0], elements[-1][1]


class StreamLoader:
    """Batches of a ``ShardStream``; like ``dataset.Loader``: each ``for batch in loader`` is one epoch, ``epoch``
    the epoch of the latest loop, ``position`` the batches consumed since step 0, ``dataset.bad`` the bad samples.
    ``state()`` is the resume position (``saved`` restores one). ``prefetch``, ``pin_memory``: ``loader_options``."""

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        num_workers: int,
        drop_last: bool,
        batches: int = 0,
        saved: dict[str, Any] | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.stream, self.dataset = stream, stream.prep
        self.options = loader_options(num_workers, prefetch, pin_memory)
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.position = batches
        self._next = StreamPosition.start(stream.workers, saved)
        self.epoch = self._next.epoch
        self._current = self._next

    def state(self) -> dict[str, Any]:
        return asdict(self._current)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._current, self._next = self._next, StreamPosition(self._next.epoch + 1, [0] * self.stream.workers)
        self.epoch = self._current.epoch
        self.stream.position = StreamPosition(self.epoch, list(self._current.consumed), self._current.next_worker)
        self.stream.rotation = self._current.next_worker
        loader = DataLoader(
            self.stream,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            collate_fn=_collate_stream,
            **self.options,
        )
        return self._batches(loader)

    def _batches(self, loader: DataLoader) -> Iterator[dict[str, Any]]:
        skipped = 0
        for batch, bad, worker, count in loader:
            for item in bad:
                if not self.dataset.skip_bad:
                    raise with_hint(BadSampleError(item.source, item.reason))
                self.dataset.record_bad(item.source, item.reason)
            skipped += len(bad)
            self._current.consumed[worker] = count
            self._current.next_worker = (worker + 1) % self.stream.workers
            self.position += 1
            if batch is not None:
                yield batch
        self._current = self._next
        if skipped:
            logger.warning("epoch %d: skipped %d bad sample(s) on this rank", self.epoch, skipped)


def training_stream(
    cfg: Config,
    shards: list[str],
    prep: Preprocessors,
    rank: int = 0,
    world_size: int = 1,
    batches: int = 0,
    saved: dict[str, Any] | None = None,
    pin_memory: bool = False,
) -> StreamLoader:
    """The loader a training run on shards uses (augmented, shuffled, full batches; ``pin_memory`` when the model
    is on a GPU), from the run's config.
    ``batches`` and ``saved``: the resume position (``TrainState.batches`` and ``StreamLoader.state()``)."""
    data, batch_size = cfg.data, cfg.train.batch_size
    workers = max(data.num_workers, 1)
    quota = None
    if data.resampled:
        per_rank = data.epoch_samples // (batch_size * world_size)
        if per_rank == 0:
            raise ConfigError(
                f"data.epoch_samples={data.epoch_samples} makes no batch of train.batch_size={batch_size} on "
                f"{world_size} rank(s); set it to at least {batch_size * world_size}"
            )
        quota = [(per_rank // workers + (w < per_rank % workers)) * batch_size for w in range(workers)]
    dataset = SampleDataset(
        [], data.modalities, prep, train=True, skip_bad=data.skip_bad, cache_mb=data.cache_mb, seed=cfg.seed
    )
    stream = ShardStream(
        shards,
        dataset,
        workers=workers,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        buffer=data.shuffle_buffer,
        quota=quota,
        name=f"data.train {data.train}",
    )
    return StreamLoader(
        stream,
        batch_size,
        data.num_workers,
        drop_last=True,
        batches=batches,
        saved=saved,
        prefetch=data.prefetch,
        pin_memory=pin_memory,
    )
