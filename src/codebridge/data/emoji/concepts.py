"""Join the sources into concepts: CLDR text (emojibase) on hexcode with the art of both styles (emoji-datasource).

A concept is kept only when both art styles draw it, so every suite can pair google with twitter art.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebridge.data.emoji.text import LOCALES, group_keys, group_title, read_json, read_locale

STYLES = ("google", "twitter")  # train style first: the style split trains on google and tests on twitter


@dataclass(frozen=True)
class Art:
    """One drawing of a concept: the base emoji or a skin-tone variant (same file name in both styles)."""

    hexcode: str
    image: str  # file name in img/<style>/64/
    skin: bool


@dataclass(frozen=True)
class Concept:
    row: dict[str, Any]  # the concepts.jsonl record
    art: tuple[Art, ...]  # base first, then skin-tone variants

    @property
    def id(self) -> int:
        return self.row["id"]

    @property
    def name(self) -> str:
        return self.row["name"]


def _key(hexcode: str) -> str:
    """emojibase drops the FE0F variation selector where emoji-datasource keeps it; join without it."""
    return "-".join(part for part in hexcode.upper().split("-") if part != "FE0F")


def _drawn(package: Path, style: str) -> dict[str, tuple[Art, ...]]:
    """join key -> art of the emoji that ``style`` draws (base, then skin variants present as 64 px files)."""
    folder = package / "img" / style / "64"
    present = {p.name for p in folder.glob("*.png")}
    drawn: dict[str, tuple[Art, ...]] = {}
    for entry in read_json(package / "emoji.json"):
        if entry["image"] not in present:
            continue
        skins = [
            Art(v["unified"], v["image"], True)
            for _, v in sorted(entry.get("skin_variations", {}).items())
            if v["image"] in present
        ]
        drawn[_key(entry["unified"])] = (Art(entry["unified"], entry["image"], False), *skins)
    return drawn


def _spread(items: list[Any], limit: int | None) -> list[Any]:
    """``limit`` items spread evenly over the list, so a small subset still covers every group."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return [items[i * len(items) // limit] for i in range(limit)]


def load_concepts(packages: dict[str, Path], limit: int | None = None) -> list[Concept]:
    """Concepts in CLDR order with contiguous ids; group/subgroup ids are contiguous over the kept concepts."""
    emojibase = packages["emojibase-data"]
    google = _drawn(packages["emoji-datasource-google"], "google")
    twitter = _drawn(packages["emoji-datasource-twitter"], "twitter")
    locales = {loc: read_locale(emojibase, loc) for loc in LOCALES}
    groups, subgroups = group_keys(emojibase)

    entries = sorted(
        (e for e in locales["en"].values() if "group" in e and _key(e["hexcode"]) in google.keys() & twitter.keys()),
        key=lambda e: e["order"],
    )
    entries = _spread(entries, limit)
    group_ids = {g: i for i, g in enumerate(sorted({e["group"] for e in entries}))}
    subgroup_ids = {s: i for i, s in enumerate(sorted({e["subgroup"] for e in entries}))}

    concepts = []
    for cid, entry in enumerate(entries):
        hexcode = entry["hexcode"]
        text = {}
        for loc, table in locales.items():
            if hexcode not in table:
                raise ValueError(f"emojibase-data {loc}/data.json: no entry for hexcode {hexcode} ({entry['label']})")
            text[loc] = table[hexcode]
        twitter_images = {a.image for a in twitter[_key(hexcode)]}
        art = tuple(a for a in google[_key(hexcode)] if a.image in twitter_images)
        row = {
            "id": cid,
            "hexcode": hexcode,
            "emoji": entry["emoji"],
            "name": entry["label"],
            "group": group_title(groups[entry["group"]]),
            "subgroup": subgroups[entry["subgroup"]],
            "group_id": group_ids[entry["group"]],
            "subgroup_id": subgroup_ids[entry["subgroup"]],
            "labels": {loc: t["label"] for loc, t in text.items()},
            "tags": {loc: t.get("tags", []) for loc, t in text.items()},
        }
        concepts.append(Concept(row, art))
    return concepts
