"""WebDataset tar shards: the members of one sample share a basename key (``abc.png``, ``abc.txt``, ``abc.json``).

Reading and writing live together so the two sides of the format cannot drift apart:
- a member whose extension is a registered modality's WebDataset key (``abc.png`` image, ``abc.wav`` audio,
  ``abc.mp4`` video: ``Modality.webdataset_keys``), kept as the encoded bytes (``MediaBytes``, which remembers its
  extension so a shard can be rewritten unchanged);
- ``abc.txt`` captions, one per line;
- ``abc.json`` an object with optional ``key``, ``labels`` ({name: int}), ``meta`` and ``texts`` (captions; wins over
  ``abc.txt``, needed for captions holding a line break); other keys (img2dataset's ``url``...) land in ``meta``.
Other members are ignored. The key is the member name up to the first dot of its basename (webdataset's rule).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from codebridge.data.sample import BadSampleError, Sample
from codebridge.data.sources.spec import (
    SOURCES,
    RowError,
    Source,
    clean_texts,
    media_modalities,
    not_utf8,
    parse_labels,
)
from codebridge.data.sources.tar import tar_files

Members = dict[str, bytes]  # extension -> member bytes


class MediaBytes(bytes):
    """Encoded media file bytes that remember their file extension (``png``, ``wav``...)."""

    ext: str

    def __new__(cls, data: bytes, ext: str) -> MediaBytes:
        media = super().__new__(cls, data)
        media.ext = ext
        return media

    def __reduce__(self) -> tuple[type[MediaBytes], tuple[bytes, str]]:  # DataLoader workers pickle samples
        return MediaBytes, (bytes(self), self.ext)


def shard_paths(spec: str) -> list[Path]:
    """The shards a spec names: a folder's ``*.tar`` files, one ``.tar`` or a brace pattern (``::`` joins lists)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        shards = sorted(folder.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{spec}: the folder holds no .tar shards")
        return shards
    shards = [Path(p).expanduser() for p in expand_urls(spec)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shard(s) of {spec} do not exist, e.g. {missing[0]}")
    return shards


def member_groups(path: Path) -> Iterator[tuple[str, Members]]:
    """Member groups of one shard in order, read one group at a time (``tar_files``: memory holds one sample).

    A group is yielded once the next key starts, or, for the last one, once the end-of-archive marker is found:
    a truncated shard may end inside a sample, so the group being read when the damage shows is dropped and the
    ``tarfile.ReadError`` saying why reading stopped propagates.
    """
    group: tuple[str, Members] | None = None
    for name, data in tar_files(path):
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if group is not None and group[0] != key:
            yield group
            group = None
        if group is None:
            group = (key, {})
        group[1][ext.lower()] = data
    if group is not None:
        yield group


def read_shard(path: Path) -> Iterator[tuple[str, Sample | RowError]]:
    """(source, sample or why it is unusable) for each sample of one shard, lazily; a damaged shard ends with a
    "corrupt shard" error whose source is the shard."""
    seen: set[str] = set()
    last: str | None = None
    modality_of = member_extensions()
    try:
        for key, members in member_groups(path):
            source, last = f"{path}:{key}", key
            found: Sample | RowError
            try:
                if key in seen:
                    raise RowError("malformed row", "the key appears twice; the members of a sample must be adjacent")
                seen.add(key)
                found = to_sample(source, key, members, modality_of)
            except RowError as error:
                found = error
            yield source, found
    except tarfile.ReadError as exc:
        where = f"after key {last!r}" if last is not None else "before the first complete sample"
        yield (
            str(path),
            RowError(
                "corrupt shard",
                f"truncated or corrupt tar ({exc}) {where}; re-download or re-create it "
                "(codebridge data shard SOURCE OUT)",
            ),
        )


def utf8_member(raw: bytes, ext: str) -> str:
    """A text member as str; a ``RowError`` naming the line and byte where it stops being UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RowError("malformed row", f"the .{ext} member is {not_utf8(raw, error)}", "text") from None


def parse_info(raw: bytes) -> dict[str, Any]:
    """The ``abc.json`` member: key/labels/meta/texts, with any other key folded into meta."""
    try:
        info = json.loads(utf8_member(raw, "json"))
    except json.JSONDecodeError as exc:
        raise RowError("malformed row", f"the .json member is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise RowError("malformed row", f"the .json member must hold an object, got {type(info).__name__}")
    fields: dict[str, Any] = {}
    if "key" in info:
        fields["key"] = str(info.pop("key"))
    if "labels" in info:
        fields["labels"] = parse_labels(info.pop("labels"))
    meta = info.pop("meta", {})
    if not isinstance(meta, dict):
        raise RowError("malformed row", f"meta in the .json member must be an object, got {meta!r}")
    if "texts" in info:
        texts = info.pop("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RowError("malformed row", f"texts in the .json member must be a list of strings, got {texts!r}")
        fields["texts"] = clean_texts(texts)
    fields["meta"] = {**info, **meta}
    return fields


def member_extensions() -> dict[str, str]:
    """Member extension -> the media modality stored under it (the registered modalities' WebDataset keys)."""
    from codebridge.data.modalities import modality  # lazy: the modalities import torch

    return {ext: name for name in media_modalities() for ext in modality(name).webdataset_keys}


def to_sample(source: str, key: str, members: Members, modality_of: dict[str, str] | None = None) -> Sample:
    """One sample from its members; ``modality_of``: ``member_extensions()``, passed in so a shard looks the
    registered modalities up once, not once per sample."""
    sample = Sample(key=key, source=source)
    modality_of = member_extensions() if modality_of is None else modality_of
    for ext, data in members.items():
        modality = modality_of.get(ext)
        if modality is None:
            continue
        if modality in sample.media:
            raise RowError("malformed row", f"two {modality} members for one key; keep one", modality)
        sample.media[modality] = MediaBytes(data, ext)
    if "txt" in members:
        lines = utf8_member(members["txt"], "txt").split("\n")
        sample.media["text"] = clean_texts([line for line in lines if line.strip()])
    if "json" in members:
        info = parse_info(members["json"])
        if "texts" in info:
            sample.media["text"] = info.pop("texts")
        for name, value in info.items():
            setattr(sample, name, value)
    if not any(sample.has(m) for m in sample.media):
        raise RowError("malformed row", f"no media or caption member; expected e.g. {key}.png and {key}.txt")
    return sample


@SOURCES.register("webdataset")
class ShardSource(Source):
    """WebDataset shards, read lazily one sample at a time; training streams them (``data/stream.py``)."""

    accepts = "a .tar shard, a folder of .tar shards, or a brace pattern such as dir/shard-{00000..00009}.tar"

    @classmethod
    def handles(cls, spec: str) -> bool:
        return spec.lower().endswith(".tar") or Path(spec).expanduser().is_dir()

    def shards(self) -> list[str]:
        return [str(path) for path in shard_paths(self.spec)]

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards():
            for source, found in read_shard(Path(shard)):
                if isinstance(found, RowError):
                    self.problems.add(source, found)
                else:
                    yield found


def media_member(sample: Sample, modality: str) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's media file, as a shard stores it."""
    value = sample.media[modality]
    if isinstance(value, MediaBytes):
        return value.ext, bytes(value)
    if isinstance(value, bytes):
        raise BadSampleError(sample.source, f"{modality} bytes without a file extension cannot be stored in a shard")
    ext = Path(value).suffix.lstrip(".").lower()
    keys = [e for e, m in member_extensions().items() if m == modality]
    if ext not in keys:
        raise BadSampleError(
            sample.source,
            f"{modality} file {value}: extension {ext!r} cannot be stored in a shard; "
            f"convert it to one of {', '.join(keys)}",
        )
    return ext, Path(value).read_bytes()


def to_record(sample: Sample, member_key: str) -> dict[str, bytes | str]:
    """A sample as a ``webdataset.ShardWriter`` record: media bytes, captions, and key/labels/meta in the json."""
    record: dict[str, bytes | str] = {"__key__": member_key}
    for modality in media_modalities():
        if sample.has(modality):
            ext, data = media_member(sample, modality)
            record[ext] = data
    info: dict[str, Any] = {"key": sample.key, "labels": sample.labels, "meta": sample.meta}
    if texts := sample.media.get("text"):
        record["txt"] = "\n".join(texts).encode("utf-8")
        if any("\n" in t for t in texts):
            info["texts"] = texts
    record["json"] = json.dumps(info, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return record
