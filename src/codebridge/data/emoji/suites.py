"""The built-in suites: views of the emoji benchmark as lists of ``Sample`` (see docs/architecture.md).

Train suites include skin-tone variants as extra images; test suites use one base image per concept and style,
so every test caption has one intended match per style.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from codebridge.config import ConfigError
from codebridge.data.emoji.clips import MOTIONS
from codebridge.data.emoji.concepts import STYLES
from codebridge.data.emoji.manifest import MANIFEST, VERSION
from codebridge.data.emoji.records import read_jsonl
from codebridge.data.emoji.text import readable
from codebridge.data.sample import Sample
from codebridge.paths import emoji_root

SUITES = ("emoji-style", "emoji-concept", "emoji-voice", "emoji-trimodal", "emoji-scenes", "emoji-clips")
SPLITS = ("train", "test")
LABELS = ("concept", "group", "subgroup", "motion")  # motion: clips only


class EmojiDataNotFound(FileNotFoundError):
    """The benchmark has not been built at the expected place."""


@dataclass
class EmojiData:
    """Lazy reader of one built benchmark folder."""

    root: Path

    @classmethod
    def open(cls, root: str | Path | None = None) -> EmojiData:
        path = emoji_root(root).resolve()
        if not (path / MANIFEST).is_file():
            raise EmojiDataNotFound(f"emoji data not found at {path}; build it with `codebridge data emoji`")
        version = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("version")
        if version != VERSION:
            raise EmojiDataNotFound(
                f"emoji data at {path} has format version {version}, this codebridge reads {VERSION}; "
                "rebuild it with `codebridge data emoji`"
            )
        return cls(path)

    def table(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        return read_jsonl(self.root / name)

    @cached_property
    def concepts(self) -> dict[int, dict[str, Any]]:
        return {row["id"]: row for _, row in self.table("concepts.jsonl")}

    @cached_property
    def splits(self) -> dict[str, Any]:
        return json.loads((self.root / "splits.json").read_text(encoding="utf-8"))

    @cached_property
    def base_images(self) -> dict[tuple[int, str], str]:
        """(concept, style) -> path of the base (non skin-tone) image."""
        return {(r["concept"], r["style"]): r["file"] for _, r in self.table("images.jsonl") if not r["skin"]}

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def labels(self, concept: int) -> dict[str, int]:
        row = self.concepts[concept]
        return {"concept": concept, "group": row["group_id"], "subgroup": row["subgroup_id"]}

    def meta(self, concept: int, **extra: Any) -> dict[str, Any]:
        row = self.concepts[concept]
        return {"hexcode": row["hexcode"], "name": row["name"], **extra}


def _source(table: str, lineno: int) -> str:
    return f"emoji/{table}:{lineno}"


def _images(data: EmojiData, name: str, split: str, styles: tuple[str, ...], concepts: set[int] | None) -> list[Sample]:
    samples = []
    for lineno, row in data.table("images.jsonl"):
        if row["style"] not in styles or (concepts is not None and row["concept"] not in concepts):
            continue
        if split == "test" and row["skin"]:
            continue
        stem = Path(row["file"]).stem
        samples.append(
            Sample(
                key=f"{name}-{split}-{row['style']}-{stem}",
                source=_source("images.jsonl", lineno),
                media={"image": data.path(row["file"]), "text": [data.concepts[row["concept"]]["name"]]},
                labels=data.labels(row["concept"]),
                meta=data.meta(row["concept"], variant=row["variant"], style=row["style"], skin=row["skin"]),
            )
        )
    return samples


def _style(data: EmojiData, name: str, split: str) -> list[Sample]:
    return _images(data, name, split, (data.splits["style"][split],), None)


def _concept(data: EmojiData, name: str, split: str) -> list[Sample]:
    return _images(data, name, split, STYLES, set(data.splits["concept"][split]))


def _speech(data: EmojiData, name: str, split: str) -> list[Sample]:
    """One sample per (concept, voice of the split), with the art of the split's style."""
    voices = set(data.splits["voice"][split])
    style = data.splits["style"][split]
    samples = []
    for lineno, row in data.table("speech.jsonl"):
        if row["voice"] not in voices:
            continue
        folder = Path(row["file"]).parent.name
        samples.append(
            Sample(
                key=f"{name}-{split}-{folder}-{Path(row['file']).stem}",
                source=_source("speech.jsonl", lineno),
                media={
                    "image": data.path(data.base_images[row["concept"], style]),
                    "text": [row["text"]],
                    "audio": data.path(row["file"]),
                },
                labels=data.labels(row["concept"]),
                meta=data.meta(row["concept"], style=style, voice=row["voice"], speed=row["speed"], pitch=row["pitch"]),
            )
        )
    return samples


def _scenes(data: EmojiData, name: str, split: str) -> list[Sample]:
    return [
        Sample(
            key=f"{name}-{split}-{row['id']:06d}",
            source=_source("scenes.jsonl", lineno),
            media={"image": data.path(row["file"]), "text": [row["caption"]]},
            meta={"style": row["style"], "objects": row["objects"]},
        )
        for lineno, row in data.table("scenes.jsonl")
        if row["split"] == split
    ]


def _clips(data: EmojiData, name: str, split: str) -> list[Sample]:
    return [
        Sample(
            key=f"{name}-{split}-{row['id']:06d}",
            source=_source("clips.jsonl", lineno),
            media={"video": data.path(row["file"]), "text": [row["caption"]]},
            labels={**data.labels(row["concept"]), "motion": MOTIONS.index(row["motion"])},
            meta=data.meta(row["concept"], style=row["style"], motion=row["motion"], frames=row["frames"]),
        )
        for lineno, row in data.table("clips.jsonl")
        if row["split"] == split
    ]


_LOADERS: dict[str, Callable[[EmojiData, str, str], list[Sample]]] = {
    "emoji-style": _style,
    "emoji-concept": _concept,
    "emoji-voice": _speech,
    "emoji-trimodal": _speech,
    "emoji-scenes": _scenes,
    "emoji-clips": _clips,
}


def load_suite(name: str, split: str = "train", root: str | Path | None = None) -> list[Sample]:
    """Samples of a built-in suite; ``root`` is the dataset folder or the codebridge home holding ``emoji/``."""
    if name not in _LOADERS:
        raise ConfigError(f"unknown emoji suite {name!r}; choose one of {', '.join(SUITES)}")
    if split not in SPLITS:
        raise ConfigError(f"{name}: unknown split {split!r}; choose train or test (e.g. {name}:test)")
    return _LOADERS[name](EmojiData.open(root), name, split)


def class_names(label: str, root: str | Path | None = None) -> list[str]:
    """Readable class names indexed by label value, for zero-shot prompts ("smileys & emotion", "face smiling")."""
    if label == "motion":
        return list(MOTIONS)
    if label not in LABELS:
        raise ConfigError(f"unknown emoji label {label!r}; choose one of {', '.join(LABELS)}")
    concepts = EmojiData.open(root).concepts.values()
    if label == "concept":
        pairs = {(row["id"], row["name"]) for row in concepts}
    else:
        pairs = {(row[f"{label}_id"], readable(row[label])) for row in concepts}
    names = dict(pairs)
    if len(names) != len(pairs) or sorted(names) != list(range(len(names))):
        raise ValueError(f"emoji/concepts.jsonl: {label} ids are not 0..N-1 with one name each; rebuild the data")
    return [names[i] for i in range(len(names))]
