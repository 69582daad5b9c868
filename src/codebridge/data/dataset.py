"""Samples -> preprocessed tensors -> batches, with bad-sample accounting, a decoded-input cache and a
deterministic, rank-sharded, resumable loader.

Every random choice for a sample (caption, augmentation) comes from a generator seeded by
(seed, epoch, index, modality), so a resumed run, a different number of workers or another rank layout
sees exactly the same data, and adding a modality to a run does not change the others' augmentation.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from codebridge.config import Config, ConfigError
from codebridge.data.modalities import check_modalities
from codebridge.data.modalities import modality as spec_of
from codebridge.data.modalities.source import DecodeError
from codebridge.data.preprocess import Preprocessors
from codebridge.data.sample import BadSampleError, Sample

logger = logging.getLogger(__name__)

Item = dict[str, Any]
SKIP_BAD_HINT = "fix or remove the file, or pass --set data.skip_bad=true to skip (and count) bad samples"


def decode(prep: Preprocessors, sample: Sample, modality: str) -> Any:
    """The one decoding path for the media of a sample (training, evaluation and ``data check`` alike): the
    modality's raw item (e.g. image uint8 [H,W,3], waveform, frames); any failure is a ``BadSampleError`` naming
    the sample's source and the file."""
    try:
        return prep[modality].decode(sample.media[modality])
    except DecodeError as exc:
        raise BadSampleError(sample.source, str(exc)) from exc  # "image FILE: what is wrong"


def with_hint(err: BadSampleError) -> BadSampleError:
    """The error a user sees when samples are not skipped: what is wrong, then how to fix or skip it."""
    return BadSampleError(err.source, f"{err.reason}; {SKIP_BAD_HINT}")


def all_texts(samples: Iterable[Sample]) -> Iterator[str]:
    """Every caption of every sample, in order and lazily: the corpus the tokenizer is trained on."""
    return (text for sample in samples for text in sample.media.get("text", []))


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, index, ...); negative ones are taken modulo 2**64."""
    entropy = [v % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _generator(*values: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*values))


class SampleDataset(Dataset):
    """Decodes and preprocesses ``modalities`` of each sample into the per-item form of the batch contract.

    ``__getitem__(i)`` -> {"index": i, "labels": {name: int}, modality: {name: tensor}}; "text" holds ONE
    caption (random at train time, the first at eval). A sample that lacks a modality or fails to decode raises
    ``BadSampleError`` naming its source; with ``skip_bad`` it gives None instead, and (source, reason) is
    appended to ``bad`` and logged, once per sample however many epochs meet it. With ``cache_mb`` > 0, decoded
    inputs (image uint8 arrays, waveforms, frame arrays; before any augmentation), and decoding failures, stay in
    a per-process LRU of at most ``cache_mb`` MiB, so later epochs skip decoding: each DataLoader worker (kept
    alive across epochs by ``build_loader``) holds its own, so the memory is num_workers x cache_mb at most.
    """

    def __init__(
        self,
        samples: list[Sample],
        modalities: list[str],
        prep: Preprocessors,
        train: bool,
        skip_bad: bool = False,
        cache_mb: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.specs = check_modalities(modalities)
        if "text" in modalities and prep.tokenizer is None:
            raise ValueError(
                "the text modality needs a tokenizer: "
                "Preprocessors(prep, Tokenizer.train(all_texts(samples), prep.text))"
            )
        self.samples = samples
        self.modalities = list(modalities)
        self.prep = prep
        self.train = train
        self.skip_bad = skip_bad
        self.cache = DecodedCache(cache_mb)
        self.seed = seed
        self.epoch = 0
        self.bad: list[tuple[str, str]] = []  # distinct bad samples, in the order first met
        self._bad_sources: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``__getitem__`` draws its randomness for (the loader passes it explicitly instead)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Item | None:
        try:
            return self.load(index, self.epoch)
        except BadSampleError as err:
            if not self.skip_bad:
                raise with_hint(err) from None
            self.record_bad(err.source, err.reason)
            return None

    def record_bad(self, source: str, reason: str) -> None:
        """Count and log a skipped sample the first time it is met (later epochs meet it again silently)."""
        if source in self._bad_sources:
            return
        self._bad_sources.add(source)
        self.bad.append((source, reason))
        logger.warning("skipping bad sample %s: %s", source, reason)

    def load(self, index: int, epoch: int) -> Item:
        """Sample ``index`` preprocessed with the randomness of ``epoch``; raises BadSampleError."""
        return self.prepare(self.samples[index], index, epoch)

    def prepare(self, sample: Sample, index: int, epoch: int) -> Item:
        """``sample`` preprocessed with the randomness of (seed, epoch, index); (index, source) keys the decoded
        cache, so a streamed sample (not in ``samples``, index a hash of its source) is cached too."""
        item: Item = {"index": index, "labels": dict(sample.labels)}
        for spec in self.specs:
            generator = _generator(self.seed, epoch, index, spec.stream)
            item[spec.name] = self.prep[spec.name].entry(self._decode(sample, index, spec.name), self.train, generator)
        return item

    def _decode(self, sample: Sample, index: int, modality: str) -> Any:
        if not sample.has(modality):
            raise BadSampleError(
                sample.source, f"has no {modality}, which this run needs (data.modalities={self.modalities})"
            )
        key = (index, sample.source, modality)  # a streamed sample's index is a hash of its source: keep both
        decoded = self.cache.get(key)
        if decoded is None:
            try:
                decoded = decode(self.prep, sample, modality)
            except BadSampleError as err:
                decoded = err
            self.cache.put(key, decoded)
        return _raise_or_return(decoded)


def nbytes(value: Any) -> int:
    """Memory held by a decoded input (an array, a tensor, or a small object such as a decoding error)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 256


class DecodedCache:
    """Decoded inputs by (index, source, modality), least recently used dropped first so they fit ``mb`` MiB (0: off).

    Why a byte budget: decoded images and clips are ten to a hundred times their files; an unbounded cache grows
    with the data set, per DataLoader worker.
    """

    def __init__(self, mb: float) -> None:
        self.budget = int(mb * 2**20)
        self.size = 0
        self._items: OrderedDict[tuple[int, str, str], tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[int, str, str]) -> Any:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: tuple[int, str, str], value: Any) -> None:
        size = nbytes(value)
        if size > self.budget:
            return
        self._items[key] = (value, size)
        self.size += size
        while self.size > self.budget:
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped


def _raise_or_return(decoded: Any) -> Any:
    if isinstance(decoded, BadSampleError):
        raise decoded
    return decoded


def collate(items: list[Item | None]) -> dict[str, Any] | None:
    """Items -> the batch contract: Nones (skipped samples) dropped, each modality's entries collated by its spec
    (stacked, variable-length ones right-padded with zeros/False); a label a sample lacks is -1. None if empty."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    names = sorted({name for item in items for name in item["labels"]})
    batch: dict[str, Any] = {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "labels": {name: torch.tensor([item["labels"].get(name, -1) for item in items]) for name in names},
    }
    for name in items[0]:
        if name not in ("index", "labels"):
            batch[name] = spec_of(name, "batch").collate([item[name] for item in items])
    return batch


@dataclass(frozen=True)
class _Bad:
    """A BadSampleError as a plain value (exceptions with two arguments do not survive worker pickling)."""

    source: str
    reason: str


class _EpochItems(Dataset):
    """Indexed by (epoch, index), so persistent workers need no epoch broadcast; bad samples become ``_Bad``."""

    def __init__(self, dataset: SampleDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Item | _Bad:
        epoch, index = key
        try:
            return self.dataset.load(index, epoch)
        except BadSampleError as err:
            return _Bad(err.source, err.reason)


def _collate_keeping_bad(items: list[Item | _Bad]) -> tuple[dict[str, Any] | None, list[_Bad]]:
    bad = [item for item in items if isinstance(item, _Bad)]
    return collate([item for item in items if not isinstance(item, _Bad)]), bad


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This rank's batches of (epoch, index) for the epoch and first batch set before iterating.

    Order: a permutation seeded by (seed, epoch) (identity without shuffle). Rank r takes every
    world_size-th index from position r, so the ranks' batch s together are the global batch s of one
    process with batch_size * world_size. With drop_last every rank gets the same number of full batches.
    """

    def __init__(
        self, size: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world_size: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.first = 0

    def indices(self, epoch: int) -> list[int]:
        """Every index this rank sees in ``epoch``, in order."""
        order = torch.randperm(self.size, generator=_generator(self.seed, epoch)) if self.shuffle else range(self.size)
        mine = [int(i) for i in order[self.rank :: self.world_size]]
        return mine[: self.size // self.world_size] if self.drop_last else mine

    def __len__(self) -> int:
        per_rank = len(range(self.rank, self.size, self.world_size))
        if self.drop_last:
            return (self.size // self.world_size) // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.indices(self.epoch)
        for b in range(self.first, len(self)):
            yield [(self.epoch, i) for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]


def loader_options(num_workers: int, prefetch: int, pin_memory: bool) -> dict[str, Any]:
    """The DataLoader keywords that keep a GPU fed: ``num_workers`` processes decode ahead, each ``prefetch``
    batches in advance (torch refuses a prefetch factor without workers), and with ``pin_memory`` batches land in
    page-locked memory so the trainer's ``non_blocking`` copy to the GPU runs asynchronously."""
    return {
        "num_workers": num_workers,
        "prefetch_factor": prefetch if num_workers > 0 else None,
        "pin_memory": pin_memory,
    }


class Loader:
    """Batches of a SampleDataset; each ``for batch in loader`` is one epoch, the next loop the next epoch.

    The first loop runs epoch ``start_step // len(loader)`` from batch ``start_step % len(loader)``: skipped
    batches are never decoded. ``epoch`` is the epoch of the latest loop. Bad samples (with ``skip_bad``) are
    recorded in ``dataset.bad`` in this process, whichever worker met them; a batch of only bad samples is left out.
    ``position`` counts the batches consumed since step 0, left-out ones included: the ``start_step`` that resumes
    right after the last batch handed out. ``prefetch`` and ``pin_memory``: see ``loader_options``.
    """

    def __init__(
        self,
        dataset: SampleDataset,
        batches: EpochBatches,
        num_workers: int,
        start_step: int,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self._batches = batches
        self._next_epoch, self._first = divmod(start_step, len(batches))
        self.epoch = self._next_epoch
        self.position = start_step
        self._loader = DataLoader(
            _EpochItems(dataset),
            batch_sampler=batches,
            collate_fn=_collate_keeping_bad,
            persistent_workers=num_workers > 0,  # workers keep their decoded-input caches across epochs
            **loader_options(num_workers, prefetch, pin_memory),
            generator=torch.Generator().manual_seed(batches.seed),  # leave the global RNG alone
        )

    def __len__(self) -> int:
        return len(self._batches)

    def state(self) -> dict[str, Any]:
        """The resume position besides ``position``: none (``StreamLoader`` has one)."""
        return {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch, self._batches.epoch, self._batches.first = self._next_epoch, self._next_epoch, self._first
        self._next_epoch, self._first = self._next_epoch + 1, 0
        self.dataset.set_epoch(self.epoch)
        return self._batches_of_epoch()

    def _batches_of_epoch(self) -> Iterator[dict[str, Any]]:
        skipped = 0
        for batch, bad in self._loader:
            for item in bad:
                if not self.dataset.skip_bad:
                    raise with_hint(BadSampleError(item.source, item.reason))
                self.dataset.record_bad(item.source, item.reason)
            skipped += len(bad)
            self.position += 1
            if batch is not None:
                yield batch
        if skipped:
            logger.warning(
                "epoch %d: skipped %d bad sample(s) on this rank (%d distinct so far)",
                self.epoch,
                skipped,
                len(self.dataset.bad),
            )


def build_loader(
    dataset: SampleDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    name: str = "the dataset",
    prefetch: int = 2,
    pin_memory: bool = False,
) -> Loader:
    """A deterministic (seed, epoch) -> order loader over this rank's shard; see ``Loader`` and ``EpochBatches``.
    ``name`` is how an error calls the data (``data.train train.csv``)."""
    batches = EpochBatches(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size)
    if len(batches) == 0:
        raise ConfigError(
            f"{name}: {len(dataset)} sample(s) over {world_size} rank(s) make no "
            + ("full " if drop_last else "")
            + f"batch of train.batch_size={batch_size}; "
            + (
                "add data"
                if len(dataset) < world_size
                else f"lower train.batch_size (e.g. --set train.batch_size={len(dataset) // world_size}) or add data"
            )
        )
    return Loader(dataset, batches, num_workers, start_step, prefetch, pin_memory)


class _Probe(Dataset):
    """Whether each sample's media in ``modalities`` decode: None, or the ``_Bad`` that says why not."""

    def __init__(self, samples: list[Sample], modalities: list[str], prep: Preprocessors) -> None:
        self.samples, self.prep, self.modalities = samples, prep, modalities

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> _Bad | None:
        sample = self.samples[index]
        for modality in self.modalities:
            if sample.has(modality):
                try:
                    decode(self.prep, sample, modality)
                except BadSampleError as err:
                    return _Bad(err.source, err.reason)
        return None


def decodable(
    samples: list[Sample], modalities: list[str], prep: Preprocessors, num_workers: int = 0
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The samples whose media in ``modalities`` all decode, and (source, reason) of the others.

    Why: evaluation with ``data.skip_bad`` must leave a bad sample out of every modality at once, before anything
    is embedded, or the rows of the modalities and the labels would no longer line up.
    """
    probe = DataLoader(_Probe(samples, modalities, prep), batch_size=64, collate_fn=list, num_workers=num_workers)
    verdicts = [verdict for batch in probe for verdict in batch]
    good = [sample for sample, verdict in zip(samples, verdicts, strict=True) if verdict is None]
    return good, [(v.source, v.reason) for v in verdicts if v is not None]


def training_loader(
    cfg: Config,
    samples: list[Sample],
    prep: Preprocessors,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    pin_memory: bool = False,
) -> Loader:
    """The loader a training run uses (augmented, cached within data.cache_mb, shuffled, full batches;
    ``pin_memory`` when the model is on a GPU).

    Why here: the trainer and the loader benchmark must measure the same loader.
    """
    data = cfg.data
    dataset = SampleDataset(
        samples, data.modalities, prep, train=True, skip_bad=data.skip_bad, cache_mb=data.cache_mb, seed=cfg.seed
    )
    return build_loader(
        dataset,
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=data.num_workers,
        drop_last=True,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        name=f"data.train {data.train}",
        prefetch=data.prefetch,
        pin_memory=pin_memory,
    )
