"""``codebridge data shard``: any data spec rewritten as WebDataset tar shards ``OUT/shard-NNNNN.tar``.

Members are named by the sample's position (``000000042.png``) so any key is safe in a tar; the original key,
labels and meta travel in the ``.json`` member and come back unchanged when the shards are read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm
from webdataset import ShardWriter

from codebridge.config import DataConfig
from codebridge.data.sample import Sample
from codebridge.data.sources import open_source
from codebridge.data.sources.webdataset import to_record
from codebridge.files import commit

PATTERN = "shard-%05d.tar"
PARTIAL = ".shard-%05d.tar.tmp"  # a shard being written; renamed to PATTERN once complete, so no torn shard is seen


def _publish(partial: str) -> Path:
    final = Path(partial).with_name(Path(partial).name[1:].removesuffix(".tmp"))
    commit(Path(partial), final)
    return final


def write_shards(spec: str, out: Path, data: DataConfig, samples_per_shard: int = 1000) -> list[Path]:
    """Write every sample of ``spec`` (original media bytes, all captions) into shards; returns their paths."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    samples = open_source(spec, data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if existing := sorted(out.glob("shard-*.tar")):
        raise FileExistsError(f"{out} already holds shards ({existing[0].name}, ...); choose an empty folder")
    return write_samples(samples, out, samples_per_shard, f"sharding {spec}")


def write_samples(
    samples: Iterable[Sample], out: Path, samples_per_shard: int = 1000, desc: str = "sharding", progress: bool = True
) -> list[Path]:
    """Write ``samples`` in order into ``out/shard-NNNNN.tar`` (byte-identical for identical samples)."""
    samples = list(samples)
    if not samples:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with ShardWriter(
        str(out / PARTIAL),
        maxcount=samples_per_shard,
        post=lambda name: written.append(_publish(name)),
        verbose=0,
        mtime=0.0,  # byte-identical shards for identical input
        mode=0o644,
        encoder=False,  # records already hold the encoded bytes
    ) as sink:
        for index, sample in enumerate(tqdm(samples, desc=desc, unit="sample", disable=None if progress else True)):
            sink.write(to_record(sample, f"{index:09d}"))
    return written
