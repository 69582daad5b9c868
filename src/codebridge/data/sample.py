"""The one in-memory record every data source produces, before any decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class BadSampleError(ValueError):
    """A sample cannot be used; the message names its source (file:line or shard:key) and how to fix it."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.source = source
        self.reason = reason


@dataclass
class Sample:
    """One item of a dataset: ``media`` maps a registered modality's name to its reference, every one optional.

    A media reference is a file path (str) or the encoded file bytes (from a tar shard); ``media["text"]`` is the
    list of captions (one or several).
    ``source`` says where the sample came from ("train.csv:12", "shard-00003.tar:000042") for error messages.
    ``labels`` maps a label name (e.g. "concept", "group") to an integer class.
    """

    key: str
    source: str
    media: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def has(self, modality: str) -> bool:
        """Whether the sample holds ``modality`` (an empty caption list is none)."""
        value = self.media.get(modality)
        return value is not None and not (isinstance(value, list) and not value)
