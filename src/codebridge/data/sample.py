"""The one in-memory record every data source produces, before any decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODALITIES = ("image", "text", "audio", "video")


class BadSampleError(ValueError):
    """A sample cannot be used; the message names its source (file:line or shard:key) and how to fix it."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.source = source
        self.reason = reason


@dataclass
class Sample:
    """One item of a dataset. Every modality is optional; ``texts`` may hold several captions.

    ``image``/``audio``/``video`` are a file path (str) or the encoded file bytes (from a tar shard).
    ``source`` says where the sample came from ("train.csv:12", "shard-00003.tar:000042") for error messages.
    ``labels`` maps a label name (e.g. "concept", "group") to an integer class.
    """

    key: str
    source: str
    image: str | bytes | None = None
    texts: list[str] = field(default_factory=list)
    audio: str | bytes | None = None
    video: str | bytes | None = None
    labels: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def has(self, modality: str) -> bool:
        if modality == "text":
            return bool(self.texts)
        return getattr(self, modality) is not None
