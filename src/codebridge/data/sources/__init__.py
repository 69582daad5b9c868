"""Data sources: every spec (built-in suite, CSV/TSV, JSONL, WebDataset shards) becomes a list of ``Sample``."""

from __future__ import annotations

from codebridge.config import DataConfig
from codebridge.data.sample import Sample
from codebridge.data.sources import builtin, csv, jsonl, webdataset  # noqa: F401  (register the readers)
from codebridge.data.sources.spec import SOURCES, Problem, Problems, source_kind

__all__ = ["SOURCES", "SPEC_SEPARATOR", "Problem", "Problems", "open_source", "read_source", "source_kind"]

SPEC_SEPARATOR = "::"  # "a::b" trains on both sources, as OpenCLIP's --train-data joins shard lists


def read_source(spec: str, data: DataConfig, problems: Problems) -> list[Sample]:
    """Samples of ``spec`` (several specs joined by ``::`` are concatenated in order); bad rows go to
    ``problems`` (raised there unless it collects them)."""
    if SPEC_SEPARATOR in spec:
        return [sample for part in spec.split(SPEC_SEPARATOR) for sample in read_source(part, data, problems)]
    return SOURCES.get(source_kind(spec))(spec, data, problems)


def open_source(spec: str, data: DataConfig) -> list[Sample]:
    """Samples of ``spec``. A bad row is a ``BadSampleError`` naming file and line/key, or with
    ``data.skip_bad`` it is skipped, counted and logged."""
    problems = Problems(skip=data.skip_bad)
    samples = read_source(spec, data, problems)
    problems.log(spec)
    return samples
