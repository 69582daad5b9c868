"""Per-modality preprocessing and the bundle of it that is saved next to a model's weights.

``Preprocessors.save``/``load`` write and read ``preprocessing.json`` (the PrepConfig) and the tokenizer files,
so a loaded model preprocesses exactly like it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codebridge.config import ConfigError, PrepConfig, from_dict, to_dict
from codebridge.data.preprocess.audio import AudioProcessor
from codebridge.data.preprocess.image import ImageProcessor
from codebridge.data.preprocess.text import TOKENIZER_FILE, Tokenizer
from codebridge.data.preprocess.video import VideoProcessor

PREP_FILE = "preprocessing.json"

__all__ = ["AudioProcessor", "ImageProcessor", "Preprocessors", "Tokenizer", "VideoProcessor"]


class Preprocessors:
    """One processor per modality; ``text`` is the tokenizer (None until one is trained or loaded)."""

    def __init__(self, prep: PrepConfig, tokenizer: Tokenizer | None = None) -> None:
        if tokenizer is not None and tokenizer.prep != prep.text:
            raise ConfigError(
                f"prep.text {to_dict(prep.text)} differs from the tokenizer's settings {to_dict(tokenizer.prep)}; "
                "train the tokenizer with the run's prep.text (or load both from the same model folder)"
            )
        self.prep = prep
        self.image = ImageProcessor(prep.image)
        self.text = tokenizer
        self.audio = AudioProcessor(prep.audio)
        self.video = VideoProcessor(prep.video, prep.image)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self.prep)

    def save(self, directory: str | Path) -> None:
        """Write ``preprocessing.json`` and, when there is a tokenizer, its files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREP_FILE).write_text(json.dumps(self.to_dict(), indent=2))
        if self.text is not None:
            self.text.save(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Preprocessors:
        directory = Path(directory)
        path = directory / PREP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; a model folder is written by Preprocessors.save")
        try:
            prep = from_dict(PrepConfig, json.loads(path.read_text()))
        except (ConfigError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        tokenizer = Tokenizer.load(directory) if (directory / TOKENIZER_FILE).is_file() else None
        return cls(prep, tokenizer)
