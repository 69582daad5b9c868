"""Data sources: every spec (built-in suite, CSV/TSV, JSONL, WebDataset shards) is a ``Source`` of ``Sample``s."""

from __future__ import annotations

from collections.abc import Iterator

from codebridge.config import DataConfig
from codebridge.data.corpus import source as corpus_source  # noqa: F401  (registers the corpus suites)
from codebridge.data.sample import Sample
from codebridge.data.sources import builtin, csv, jsonl, webdataset  # noqa: F401  (register the readers)
from codebridge.data.sources.spec import SOURCES, Problem, Problems, Source, source_class

__all__ = [
    "SOURCES",
    "SPEC_SEPARATOR",
    "Problem",
    "Problems",
    "Source",
    "open_source",
    "read_source",
    "source_for",
]

SPEC_SEPARATOR = "::"  # "a::b" trains on both sources, as OpenCLIP's --train-data joins shard lists


class JoinedSource(Source):
    """Specs joined by ``::``: their samples in order; shards when every part streams, a length when all know it."""

    accepts = "specs joined by ::"

    def __init__(self, spec: str, data: DataConfig, problems: Problems) -> None:
        super().__init__(spec, data, problems)
        self.parts = [source_for(part, data, problems) for part in spec.split(SPEC_SEPARATOR)]

    @classmethod
    def handles(cls, spec: str) -> bool:
        return SPEC_SEPARATOR in spec

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts:
            yield from part

    def length(self) -> int | None:
        lengths = [part.length() for part in self.parts]
        return None if None in lengths else sum(lengths)  # type: ignore[arg-type]

    def shards(self) -> list[str] | None:
        shards = [part.shards() for part in self.parts]
        return None if None in shards else [s for part in shards for s in part]  # type: ignore[union-attr]


def source_for(spec: str, data: DataConfig, problems: Problems | None = None) -> Source:
    """The source reading ``spec`` (nothing is read yet); bad rows go to ``problems`` (default: raised)."""
    problems = Problems(skip=data.skip_bad) if problems is None else problems
    kind = JoinedSource if JoinedSource.handles(spec) else source_class(spec)
    return kind(spec, data, problems)


def read_source(spec: str, data: DataConfig, problems: Problems) -> list[Sample]:
    """Samples of ``spec`` (several specs joined by ``::`` are concatenated in order); bad rows go to
    ``problems`` (raised there unless it collects them)."""
    return list(source_for(spec, data, problems))


def open_source(spec: str, data: DataConfig) -> list[Sample]:
    """Samples of ``spec``. A bad row is a ``BadSampleError`` naming file and line/key, or with
    ``data.skip_bad`` it is skipped, counted and logged."""
    problems = Problems(skip=data.skip_bad)
    samples = read_source(spec, data, problems)
    problems.log(spec)
    return samples
