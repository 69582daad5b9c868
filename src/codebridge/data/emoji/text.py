"""CLDR text of the emoji (emojibase-data): labels and tags per locale, group and subgroup names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOCALES = ("en", "de", "fr", "es", "ja")  # en first: the label every suite uses as the caption


def read_json(path: Path) -> Any:
    """Parse a source file; a broken one names itself and how to recover."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: cannot read ({exc}); delete its npm cache folder and run `codebridge data emoji` again"
        ) from exc


def read_locale(emojibase: Path, locale: str) -> dict[str, dict[str, Any]]:
    """hexcode -> emojibase entry (``label``, ``tags``, ``group``, ``subgroup``, ``order``) of one locale."""
    return {entry["hexcode"]: entry for entry in read_json(emojibase / locale / "data.json")}


def group_keys(emojibase: Path) -> tuple[dict[int, str], dict[int, str]]:
    """emojibase group and subgroup ints -> their keys ("smileys-emotion", "face-smiling")."""
    meta = read_json(emojibase / "meta" / "groups.json")
    groups = {int(k): v for k, v in meta["groups"].items()}
    subgroups = {int(k): v for k, v in meta["subgroups"].items()}
    return groups, subgroups


def group_title(key: str) -> str:
    """ "smileys-emotion" -> "Smileys & Emotion" (each hyphen of a CLDR group key stands for "&")."""
    return key.replace("-", " & ").title()


def readable(name: str) -> str:
    """Zero-shot class name: "Smileys & Emotion" -> "smileys & emotion", "face-smiling" -> "face smiling"."""
    return name.replace("-", " ").lower()
