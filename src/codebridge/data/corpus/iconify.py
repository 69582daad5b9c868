"""Iconify JSON icon sets: icons with their boxes, aliases (with flips and rotations), categories, and the
mapping of an emoji set's icon names to code points.

Iconify emoji sets name icons by keyword, not by code point: a set's ``chars.json`` maps code points to names when
it has one; otherwise names are matched against the CLDR and Unicode names of the concepts, compared with
everything but letters and digits removed ("admissiontickets" = "admission tickets"). A name two concepts share is
left out, never guessed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebridge.data.corpus.sets import ArtSet, check_license


@dataclass(frozen=True)
class Icon:
    """One drawable icon: SVG body in its view box, plus the transformation an alias adds."""

    name: str
    body: str
    left: float
    top: float
    width: float
    height: float
    hflip: bool = False
    vflip: bool = False
    rotate: int = 0  # quarter turns clockwise

    def svg(self) -> str:
        box = f"{self.left} {self.top} {self.width} {self.height}"
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{box}" width="{self.width}" height="{self.height}" color="#000">{self.body}</svg>'
        )


@dataclass(frozen=True)
class IconSet:
    icons: dict[str, Icon]  # name -> icon, aliases included, hidden icons left out
    alternates: dict[str, str]  # alias without transformation -> icon name (another name for the same drawing)
    chars: dict[str, str]  # code point key -> icon name
    categories: dict[str, str]  # icon name -> its first category (sorted), when the set has categories


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc}); delete its npm cache folder and build again") from exc


def read_set(folder: Path, art: ArtSet) -> IconSet:
    """Read an unpacked ``@iconify-json/*`` package after checking that it declares ``art.license``."""
    info = read_json(folder / "info.json")
    package = read_json(folder / "package.json")
    check_license(
        art, [("info.json", (info.get("license") or {}).get("spdx")), ("package.json", package.get("license"))]
    )
    data = read_json(folder / "icons.json")
    default = {key: data.get(key, fallback) for key, fallback in (("left", 0), ("top", 0), ("width", 16))}
    default["height"] = data.get("height", default["width"])

    def icon(name: str, raw: dict[str, Any]) -> Icon:
        box = {key: raw.get(key, value) for key, value in default.items()}
        return Icon(name, raw["body"], **box)

    icons = {name: icon(name, raw) for name, raw in data["icons"].items() if not raw.get("hidden")}
    aliases = data.get("aliases", {})
    alternates: dict[str, str] = {}
    drawn: dict[str, Icon] = {}
    for name in aliases:
        chain = _chain(name, aliases, icons)
        if chain is None:
            continue  # dangling, hidden or cyclic alias: nothing to draw
        root, steps = chain
        if any(key in step for step in steps for key in TRANSFORMS):
            drawn[name] = _transform(icons[root], name, steps)
        else:
            alternates[name] = root
    chars_file = folder / "chars.json"
    chars = {code_key(code): name for code, name in (read_json(chars_file) if chars_file.is_file() else {}).items()}
    metadata_file = folder / "metadata.json"
    metadata = read_json(metadata_file) if metadata_file.is_file() else {}
    categories: dict[str, str] = {}
    for category, names in sorted(metadata.get("categories", {}).items()):
        for name in names:
            categories.setdefault(name, category)
    return IconSet(dict(sorted({**icons, **drawn}.items())), alternates, chars, categories)


TRANSFORMS = ("hFlip", "vFlip", "rotate", "left", "top", "width", "height")


def _chain(name: str, aliases: dict[str, Any], icons: dict[str, Icon]) -> tuple[str, list[dict[str, Any]]] | None:
    """(icon the alias ends at, the alias entries from ``name`` down to it), or None when it ends at no icon."""
    steps: list[dict[str, Any]] = []
    while name in aliases and len(steps) < 16 and not aliases[name].get("hidden"):
        steps.append(aliases[name])
        name = aliases[name].get("parent", "")
    return (name, steps) if name in icons and name not in aliases else None


def _transform(base: Icon, name: str, steps: list[dict[str, Any]]) -> Icon:
    """The parent's drawing with the flips and turns of every step (they add up) and the nearest box override."""
    box = {
        key: next((s[key] for s in steps if key in s), getattr(base, key)) for key in ("left", "top", "width", "height")
    }
    return Icon(
        name,
        base.body,
        **box,
        hflip=sum(bool(s.get("hFlip")) for s in steps) % 2 == 1,
        vflip=sum(bool(s.get("vFlip")) for s in steps) % 2 == 1,
        rotate=sum(int(s.get("rotate", 0)) for s in steps) % 4,
    )


def code_key(code: str) -> str:
    """Join key of a code point sequence: upper-case hex without the FE0F variation selector ("2764-FE0F" = "2764")."""
    return "-".join(part for part in code.upper().split("-") if part != "FE0F")


def compact(name: str) -> str:
    """Everything but ASCII letters and digits removed: "A button (blood type)" -> "abuttonbloodtype"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "", ascii_name.lower())


def name_index(names: dict[str, list[str]]) -> dict[str, str]:
    """compact name -> code point key, from key -> names; names shared by two keys are dropped as ambiguous."""
    owners: dict[str, set[str]] = {}
    for key, aliases in names.items():
        for alias in aliases:
            owners.setdefault(compact(alias), set()).add(key)
    return {name: next(iter(keys)) for name, keys in owners.items() if len(keys) == 1 and name}


def emoji_icons(icon_set: IconSet, index: dict[str, str]) -> dict[str, str]:
    """code point key -> icon name: from ``chars`` when the set has it, else by name.

    A name with a numeric suffix ("baby-2", Streamline's variants) counts for its stem when nothing else matches;
    the first icon in name order wins, exact names before suffixed ones.
    """
    if icon_set.chars:
        return {key: name for key, name in sorted(icon_set.chars.items()) if name in icon_set.icons}
    found: dict[str, str] = {}
    names = [*icon_set.icons, *icon_set.alternates]
    for exact in (True, False):
        for name in sorted(names):
            stem = name if exact else re.sub(r"-\d+$", "", name)
            if not exact and stem == name:
                continue
            key = index.get(compact(stem))
            if key is not None and key not in found:
                found[key] = icon_set.alternates.get(name, name)
    return found
