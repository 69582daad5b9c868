"""What the corpus holds: one ``Item`` per image (set, concept, raster job, captions) and the suite splits.

Ids live in one namespace: emoji concepts first (CLDR order, as the emoji benchmark numbers them), then the icons
and flags of each named set; ``group`` is the CLDR group for emoji and one group per icon set, so joined suites
(``corpus-style:train::corpus-icons:train``) never mix two meanings under one label value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codebridge.data.corpus.captions import LOCALES, emoji_captions, flag_captions, icon_captions
from codebridge.data.corpus.iconify import IconSet, code_key, emoji_icons, name_index, read_json
from codebridge.data.corpus.raster import RasterJob
from codebridge.data.corpus.sets import ArtSet
from codebridge.data.emoji.concepts import Concept, _spread
from codebridge.data.emoji.splits import TEST_FRACTION, concept_split

HELD_OUT_STYLES = {"corpus-style": "twitter", "corpus-style-noto": "noto-v1"}
# a seeded slice of every train split, held out of training: it chooses what must not be chosen on the test (the
# weight of fused retrieval, ``codebridge eval --fuse-on SUITE:val``), and it follows the train split's distribution
VAL_FRACTION = 0.05


@dataclass
class Item:
    art: ArtSet
    name: str  # icon name, or the emoji-datasource image file
    job: RasterJob
    texts: list[str]
    labels: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.art.name}-{self.name.removesuffix('.png')}"


def emoji_keywords(emojilib: Path) -> dict[str, list[str]]:
    """code point key -> emojilib keywords (its file is keyed by the emoji character itself)."""
    table = read_json(emojilib / "dist" / "emoji-en-US.json")
    return {code_key("-".join(f"{ord(c):X}" for c in emoji)): words for emoji, words in table.items()}


def concept_names(concepts: list[Concept], datasource: Path) -> dict[str, str]:
    """Name index of the concepts: CLDR label plus emoji-datasource's Unicode name and short names."""
    names: dict[str, list[str]] = {code_key(c.row["hexcode"]): [c.name] for c in concepts}
    for entry in read_json(datasource / "emoji.json"):
        key = code_key(entry["unified"])
        if key in names:
            names[key] += [entry.get("name") or "", *entry.get("short_names", [])]
    return name_index(names)


def emoji_items(
    art: ArtSet,
    concepts: list[Concept],
    keywords: dict[str, list[str]],
    size: int,
    package: Path | None = None,
    icon_set: IconSet | None = None,
    index: dict[str, str] | None = None,
) -> list[Item]:
    """The images of one emoji style: an emoji-datasource PNG folder (``package``) or an Iconify set."""
    drawn = emoji_icons(icon_set, index or {}) if icon_set is not None else {}
    items = []
    for concept in concepts:
        key = code_key(concept.row["hexcode"])
        if icon_set is None:
            assert package is not None
            name = concept.art[0].image
            job = RasterJob(png=str(package / "img" / art.name / "64" / name), size=size)
        elif key in drawn:
            icon = icon_set.icons[drawn[key]]
            name = icon.name
            job = RasterJob(svg=icon.svg(), size=size, hflip=icon.hflip, vflip=icon.vflip, rotate=icon.rotate)
        else:
            continue
        row = concept.row
        items.append(
            Item(
                art,
                name,
                job,
                emoji_captions(row, keywords.get(key, [])),
                {"concept": concept.id, "group": row["group_id"], "subgroup": row["subgroup_id"]},
                {"style": art.name, "name": concept.name, "hexcode": row["hexcode"], "license": art.license},
            )
        )
    return items


def icon_items(art: ArtSet, icon_set: IconSet, first_id: int, group: int, size: int, limit: int | None) -> list[Item]:
    """Every icon of a named set (``limit`` of them spread over name order), ids from ``first_id``."""
    categories = {c: i for i, c in enumerate(sorted(set(icon_set.categories.values())))}
    items = []
    for offset, icon in enumerate(_spread(list(icon_set.icons.values()), limit)):
        category = icon_set.categories.get(icon.name)
        labels = {"concept": first_id + offset, "group": group}
        if category is not None:
            labels["category"] = categories[category]
        job = RasterJob(svg=icon.svg(), size=size, hflip=icon.hflip, vflip=icon.vflip, rotate=icon.rotate)
        meta = {"style": art.name, "name": icon.name, "license": art.license}
        if category is not None:
            meta["category"] = category
        items.append(Item(art, icon.name, job, icon_captions(icon.name, art.noun, category), labels, meta))
    return items


def flag_items(
    art: ArtSet, icon_set: IconSet, countries: Path, first_id: int, group: int, size: int, limit: int | None
) -> list[Item]:
    """The 4:3 flag of every ISO 3166 country that ``i18n-iso-countries`` names, captioned in five languages."""
    names = {loc: read_json(countries / "langs" / f"{loc}.json")["countries"] for loc in ("en", *LOCALES)}
    codes = sorted(c for c in names["en"] if f"{c.lower()}-4x3" in icon_set.icons)
    items = []
    for offset, code in enumerate(_spread(codes, limit)):
        local = {loc: _first(table[code]) for loc, table in names.items() if code in table}
        icon = icon_set.icons[f"{code.lower()}-4x3"]
        job = RasterJob(svg=icon.svg(), size=size)
        labels = {"concept": first_id + offset, "group": group}
        meta = {"style": art.name, "name": local["en"], "country": code, "license": art.license}
        items.append(Item(art, icon.name, job, flag_captions(local), labels, meta))
    return items


def _first(name: str | list[str]) -> str:
    """i18n-iso-countries gives a list when a country has several names; the first is the usual one."""
    return name[0] if isinstance(name, list) else name


def icon_split(items: list[Item], seed: int) -> set[int]:
    """Held-out icon ids: a seeded 20% of each (set, category), so every category is tested on new names."""
    rng = random.Random(f"icon-split:{seed}")
    by_group: dict[tuple[str, int], list[int]] = {}
    for item in items:
        by_group.setdefault((item.art.name, item.labels.get("category", -1)), []).append(item.labels["concept"])
    test: set[int] = set()
    for group in sorted(by_group):
        ids = by_group[group]
        rng.shuffle(ids)
        test |= set(ids[: round(TEST_FRACTION * len(ids))])
    if not test and len(items) > 1:
        test = {rng.choice(items).labels["concept"]}
    return test


def suites(
    emoji: list[Item], icons: list[Item], concepts: list[Concept], seed: int
) -> dict[str, dict[str, list[Item]]]:
    """suite -> split -> items. Train splits are shuffled (seeded) and give their first ``VAL_FRACTION`` to a val
    split; test splits keep set and concept order."""
    out: dict[str, dict[str, list[Item]]] = {}
    styles = {item.art.name for item in emoji}
    for suite, held_out in HELD_OUT_STYLES.items():
        if held_out in styles and len(styles) > 1:
            out[suite] = {
                "train": [i for i in emoji if i.art.name != held_out],
                "test": [i for i in emoji if i.art.name == held_out],
            }
    if emoji:
        test_concepts = set(concept_split(concepts, seed)["test"])
        out["corpus-concept"] = {
            "train": [i for i in emoji if i.labels["concept"] not in test_concepts],
            "test": [i for i in emoji if i.labels["concept"] in test_concepts],
        }
    if icons:
        test_icons = icon_split(icons, seed)
        out["corpus-icons"] = {
            "train": [i for i in icons if i.labels["concept"] not in test_icons],
            "test": [i for i in icons if i.labels["concept"] in test_icons],
        }
    for suite, splits in out.items():
        random.Random(f"corpus-shuffle:{seed}:{suite}").shuffle(splits["train"])
        held = max(1, round(VAL_FRACTION * len(splits["train"]))) if len(splits["train"]) > 1 else 0
        splits["val"], splits["train"] = splits["train"][:held], splits["train"][held:]
    return out
