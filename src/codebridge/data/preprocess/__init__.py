"""The preprocessing of a run: one processor per registered modality, and the bundle saved next to a model.

``Preprocessors.save``/``load`` write and read ``preprocessing.json`` (the PrepConfig) and the tokenizer files,
so a loaded model preprocesses exactly like it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codebridge.config import ConfigError, PrepConfig, from_dict, to_dict
from codebridge.data.modalities import Processor, modality, modality_names
from codebridge.data.modalities.text import TOKENIZER_FILE, Tokenizer

PREP_FILE = "preprocessing.json"

__all__ = ["PREP_FILE", "Preprocessors", "Tokenizer"]


class Preprocessors:
    """``preprocessors[modality]``: the processor of every registered modality, built from ``prep``; the text
    processor uses ``tokenizer`` (None until one is trained or loaded)."""

    def __init__(self, prep: PrepConfig, tokenizer: Tokenizer | None = None) -> None:
        self.prep = prep
        self.tokenizer = tokenizer
        self._processors = {name: modality(name).processor(prep, tokenizer) for name in modality_names()}

    def __getitem__(self, name: str) -> Processor:
        if name not in self._processors:  # registered after these were built
            self._processors[name] = modality(name, "modality").processor(self.prep, self.tokenizer)
        return self._processors[name]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self.prep)

    def save(self, directory: str | Path) -> None:
        """Write ``preprocessing.json`` and, when there is a tokenizer, its files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREP_FILE).write_text(json.dumps(self.to_dict(), indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

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
