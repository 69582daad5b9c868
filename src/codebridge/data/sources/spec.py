"""The ``Source`` protocol every reader implements, and the one way readers report an unusable row.

A source turns a spec into ``Sample``s; each registered source says which specs it ``handles``, so there is no
central table of extensions. A bad row raises ``RowError``; ``Problems`` turns it into a
``BadSampleError`` naming file and line/key (the default) or, with ``data.skip_bad``, records it so the caller
can count and log it. ``codebridge data check`` reuses the same records to list every problem at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from codebridge.config import ConfigError, DataConfig
from codebridge.data.sample import BadSampleError, Sample
from codebridge.registry import Registry

log = logging.getLogger(__name__)


def media_modalities() -> list[str]:
    """The registered modalities stored as files (those with file extensions; captions are inline)."""
    from codebridge.data.modalities import modality, modality_names  # lazy: the modalities import torch

    return [name for name in modality_names() if modality(name).extensions]


SKIP_HINT = "or skip and count such samples with --set data.skip_bad=true"
ICONV_HINT = "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT (when it was written as Latin-1)"


class RowError(ValueError):
    """One row (or shard member group) is unusable. ``kind`` groups it in reports; ``reason`` says how to fix it."""

    def __init__(self, kind: str, reason: str, modality: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.modality = modality


@dataclass(frozen=True)
class Problem:
    source: str  # "train.csv:12", "shard-00003.tar:abc"
    kind: str  # "missing media file", "empty caption", ...
    reason: str
    modality: str = ""  # "" when the row as a whole is bad


class Problems:
    """Bad rows met while reading: raised at once, or (``skip``) collected for counting and logging."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.found: list[Problem] = []

    def add(self, source: str, error: RowError) -> None:
        if not self.skip:
            raise BadSampleError(source, f"{error.reason}, {SKIP_HINT}") from error
        self.found.append(Problem(source, error.kind, error.reason, error.modality))

    def log(self, spec: str, first: int = 3) -> None:
        """Never skip silently: one warning with the count, the count per kind and the first few reasons."""
        if not self.found:
            return
        kinds = ", ".join(f"{kind}: {n}" for kind, n in Counter(p.kind for p in self.found).most_common())
        examples = "; ".join(f"{p.source}: {p.reason}" for p in self.found[:first])
        log.warning("%s: skipped %d bad sample(s) (%s); first: %s", spec, len(self.found), kinds, examples)


class Source:
    """Samples of one spec. Register a subclass with ``@SOURCES.register(name)``; the first registered source whose
    ``handles(spec)`` is true reads the spec.

    Constructing a source reads nothing; ``__iter__`` yields the samples lazily (bad rows go to ``problems``).
    ``length()`` is the number of samples when known without reading them all, ``shards()`` the files a streaming
    source splits across ranks and DataLoader workers (None: read it as one list). The last three methods let a
    source answer what only it knows (class names of its labels, its other splits, label hierarchies), so generic
    code (evaluation) never has to know which source it reads.
    """

    accepts: ClassVar[str]  # what specs it reads, for the error listing every source: "a .jsonl file"

    def __init__(self, spec: str, data: DataConfig, problems: Problems) -> None:
        self.spec, self.data, self.problems = spec, data, problems

    @classmethod
    def handles(cls, spec: str) -> bool:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        raise NotImplementedError

    def length(self) -> int | None:
        return None

    def shards(self) -> list[str] | None:
        return None

    def class_names(self, label: str) -> dict[int, str] | None:
        """Readable names of the values of ``label`` (None: the samples' meta names them, see zeroshot.py)."""
        return None

    def split(self, name: str) -> str | None:
        """The spec of split ``name`` ("train") of the same data, or None when the source has no such notion."""
        return None

    def concept_groups(self) -> dict[int, int] | None:
        """concept -> group for data whose samples do not all carry both labels (None: the samples tell)."""
        return None


class ListSource(Source):
    """A source read whole into memory on first use (CSV, JSONL: small files; indexable for evaluation)."""

    def read(self) -> list[Sample]:
        raise NotImplementedError

    @property
    def samples(self) -> list[Sample]:
        if not hasattr(self, "_samples"):
            self._samples = self.read()
        return self._samples

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def length(self) -> int | None:
        return len(self.samples)


SOURCES: Registry[type[Source]] = Registry("data source")


def source_class(spec: str) -> type[Source]:
    """The registered source that handles ``spec`` (sources handle disjoint specs, so the order asked does not
    matter); a ``ConfigError`` listing what every source accepts."""
    for name in SOURCES.names():
        if SOURCES.get(name).handles(spec):
            return SOURCES.get(name)
    accepted = ", ".join(SOURCES.get(name).accepts for name in SOURCES.names())
    raise ConfigError(f"unknown data spec {spec!r}; expected {accepted}")


def existing_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {spec} does not exist")
    return path


def not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    """Where ``raw`` stops being UTF-8 ("line L, byte B (0xXX)", counted within ``raw``) and how to convert it."""
    line = raw.count(b"\n", 0, error.start) + 1
    return f"not UTF-8 at line {line}, byte {error.start} (0x{raw[error.start]:02x}); {ICONV_HINT}"


def encoding_error(path: Path) -> ConfigError:
    """The first byte of a text data file that is not UTF-8, with its line; found by reading the file again.

    Why line by line: a newline byte never occurs inside a multi-byte UTF-8 character, so lines decode alone."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start]
                return ConfigError(
                    f"{path}:{number}: byte {offset + error.start} (0x{byte:02x}) is not UTF-8; {ICONV_HINT}"
                )
            offset += len(raw)
    return ConfigError(f"{path}: not UTF-8 text; {ICONV_HINT}")  # unreachable for a file that failed to decode


def media_path(value: str, folder: Path, modality: str) -> str:
    """A media reference resolved against the folder of the file naming it; ``RowError`` if it is missing."""
    path = folder / Path(value).expanduser()
    if not path.is_file():
        raise RowError(
            "missing media file",
            f"{modality} file {path} does not exist (relative paths resolve against {folder}); fix the path",
            modality,
        )
    return str(path)


def clean_texts(texts: list[str]) -> list[str]:
    """Captions stripped of surrounding white space; an empty one is a ``RowError``."""
    cleaned = [t.strip() for t in texts]
    if not cleaned or not all(cleaned):
        raise RowError("empty caption", "empty caption; write a caption or remove the row", "text")
    return cleaned


def parse_labels(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise RowError("malformed row", f"labels must map names to integers, e.g. {{'group': 3}}; got {value!r}")
    return dict(value)
