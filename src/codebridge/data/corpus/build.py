"""``codebridge data corpus``: fetch the pinned sets, rasterise every image once, write each suite split as
WebDataset shards (``DIR/SUITE/SPLIT/shard-NNNNN.tar``), the license table and the manifest (last).

Idempotent like the emoji build: a second run re-hashes every file the manifest lists (the shards are small enough
to check them all) and returns; a changed option, a missing or edited file rebuilds. Only a folder this builder
marked (``.codebridge-corpus``) is ever cleared.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from codebridge.config import ConfigError
from codebridge.data.corpus.iconify import read_set
from codebridge.data.corpus.plan import (
    Item,
    concept_names,
    emoji_items,
    emoji_keywords,
    flag_items,
    icon_items,
    suites,
)
from codebridge.data.corpus.raster import render
from codebridge.data.corpus.sets import SETS, TEXT, ArtSet, select
from codebridge.data.emoji.concepts import load_concepts
from codebridge.data.emoji.manifest import MANIFEST, check_build, write_manifest
from codebridge.data.emoji.npm import PACKAGES, Pin, fetch_package, missing_packages, require_tools
from codebridge.data.emoji.parallel import Pool
from codebridge.data.emoji.records import write_jsonl
from codebridge.data.sample import Sample
from codebridge.data.shard import write_samples
from codebridge.data.sources.webdataset import MediaBytes
from codebridge.files import atomic_write_json, sha256_file
from codebridge.lock import folder_lock
from codebridge.paths import codebridge_home

VERSION = 2  # 2: val splits. Bump when the output changes, so older builds are rebuilt instead of trusted
MARKER = ".codebridge-corpus"
TABLES = ("concepts.jsonl", "licenses.json")
SUITE_FOLDERS = ("corpus-style", "corpus-style-noto", "corpus-concept", "corpus-icons")


def corpus_root(root: str | Path | None = None) -> Path:
    return Path(root).expanduser() if root is not None else codebridge_home() / "corpus"


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def build_corpus(
    out: Path | None = None,
    styles: list[str] | None = None,
    limit: int | None = None,
    size: int = 64,
    workers: int = 2,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
    sets: tuple[ArtSet, ...] = SETS,
) -> dict[str, Any]:
    """Build (or verify) the corpus at ``out`` (default ``$CODEBRIDGE_HOME/corpus``) and return its manifest.

    ``limit`` keeps that many concepts per set (spread over each set's order); ``sets`` is the catalogue ``styles``
    chooses from (tests pass their own).
    """
    if size < 8 or (limit is not None and limit < 1):
        raise ConfigError(f"size must be at least 8 and limit at least 1, got size={size}, limit={limit}")
    chosen = select(styles, sets)
    root = corpus_root(out)
    expected = {
        "version": VERSION,
        "seed": seed,
        "sources": {
            **{name: version for name, (version, _) in PACKAGES.items() if name == "emojibase-data"},
            **{art.package: art.version for art in chosen},
            **{name: version for name, (version, _, _) in TEXT.items()},
        },
        "options": {"styles": [a.name for a in chosen], "limit": limit, "size": size, "per_shard": samples_per_shard},
    }
    built, reason = check_build(root, expected, rehash=None)
    if built is None:
        if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
            raise FileExistsError(
                f"{root} is not empty and holds no corpus build (no {MARKER} file), so nothing in it was changed; "
                "give `--out` a new or empty folder"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).touch()
        with folder_lock(root, "corpus folder", "give `--out` another folder"):
            built, reason = check_build(root, expected, rehash=None)
            if built is None:
                return _build(
                    root, expected, reason, chosen, sets, limit, size, workers, seed, samples_per_shard, progress
                )
    _say(f"corpus at {root} is complete (manifest checked); nothing to do", progress)
    return built


def _fetch_all(chosen: tuple[ArtSet, ...], sets: tuple[ArtSet, ...]) -> dict[str, Path]:
    """Unpacked package folders by package name. Both emoji-datasource styles and emojibase are always fetched
    (they define the concepts), whether or not their art is chosen; they share the emoji benchmark's cache."""
    pins: dict[str, Pin] = {"emojibase-data": PACKAGES["emojibase-data"]}
    for art in sets:
        if art in chosen or art.package in PACKAGES:
            pins[art.package] = PACKAGES.get(art.package, (art.version, art.members))
    pins |= {name: (version, members) for name, (version, members, _) in TEXT.items()}
    cache = codebridge_home() / "npm"
    if missing_packages(cache, pins):
        require_tools(["npm"])
    return {name: fetch_package(name, cache, pin) for name, pin in pins.items()}


def _items(
    chosen: tuple[ArtSet, ...], folders: dict[str, Path], limit: int | None, size: int
) -> tuple[list[Item], list[Item], list[Any]]:
    packages = {
        name: folders[name] for name in ("emojibase-data", "emoji-datasource-google", "emoji-datasource-twitter")
    }
    concepts = load_concepts(packages, limit)
    keywords = emoji_keywords(folders["emojilib"])
    index = concept_names(concepts, packages["emoji-datasource-google"])
    emoji: list[Item] = []
    icons: list[Item] = []
    groups = 1 + max((c.row["group_id"] for c in concepts), default=-1)
    for art in chosen:
        folder = folders[art.package]
        if art.kind == "emoji" and art.package.startswith("emoji-datasource-"):
            emoji += emoji_items(art, concepts, keywords, size, package=folder)
            continue
        icon_set = read_set(folder, art)
        first, group = len(concepts) + len(icons), groups + sum(a.kind != "emoji" for a in chosen[: chosen.index(art)])
        if art.kind == "emoji":
            emoji += emoji_items(art, concepts, keywords, size, icon_set=icon_set, index=index)
        elif art.kind == "flags":
            icons += flag_items(art, icon_set, folders["i18n-iso-countries"], first, group, size, limit)
        else:
            icons += icon_items(art, icon_set, first, group, size, limit)
    return emoji, icons, concepts


def _clear(root: Path) -> None:
    (root / MANIFEST).unlink(missing_ok=True)
    for name in SUITE_FOLDERS:
        shutil.rmtree(root / name, ignore_errors=True)
    for table in TABLES:
        (root / table).unlink(missing_ok=True)


def _sample(item: Item, png: bytes, suite: str, split: str) -> Sample:
    return Sample(
        key=f"{suite}-{split}-{item.key}",
        source=f"{item.art.package}:{item.name}",
        media={"image": MediaBytes(png, "png"), "text": list(item.texts)},
        labels=dict(item.labels),
        meta=dict(item.meta),
    )


def _build(
    root: Path,
    expected: dict[str, Any],
    reason: str,
    chosen: tuple[ArtSet, ...],
    sets: tuple[ArtSet, ...],
    limit: int | None,
    size: int,
    workers: int,
    seed: int,
    samples_per_shard: int,
    progress: bool,
) -> dict[str, Any]:
    _say(f"building corpus at {root} ({reason})", progress)
    start = time.perf_counter()
    folders = _fetch_all(chosen, sets)
    emoji, icons, concepts = _items(chosen, folders, limit, size)
    items = emoji + icons
    with Pool(workers, progress) as pool:
        pngs = pool.map(render, [item.job for item in items], "images")
    png_of = {id(item): png for item, png in zip(items, pngs, strict=True)}
    _clear(root)

    written: list[Path] = []
    split_counts: dict[str, dict[str, int]] = {}
    for suite, splits in suites(emoji, icons, concepts, seed).items():
        for split, members in splits.items():
            samples = [_sample(item, png_of[id(item)], suite, split) for item in members]
            written += write_samples(samples, root / suite / split, samples_per_shard, f"{suite}:{split}", progress)
            split_counts.setdefault(suite, {})[split] = len(samples)

    concept_rows = [
        {"id": c.id, "kind": "emoji", "name": c.name, "hexcode": c.row["hexcode"], "group": c.row["group"]}
        for c in concepts
    ] + [{"id": i.labels["concept"], "kind": i.art.kind, "name": i.meta["name"], "group": i.art.name} for i in icons]
    write_jsonl(root / "concepts.jsonl", concept_rows)
    licenses = [
        {
            "set": art.name,
            "package": art.package,
            "version": art.version,
            "license": art.license,
            "attribution": art.attribution,
            "images": sum(item.art is art for item in items),
        }
        for art in chosen
    ]
    atomic_write_json(root / "licenses.json", licenses, indent=1, ensure_ascii=False)

    captions = [len(item.texts) for item in items]
    manifest = {
        **expected,
        "counts": {
            "concepts": len(concepts),
            "images": {art.name: row["images"] for art, row in zip(chosen, licenses, strict=True)},
            "icons": sum(item.art.kind == "icons" for item in icons),
            "flags": sum(item.art.kind == "flags" for item in icons),
            "captions_per_image": {
                "mean": round(statistics.fmean(captions), 2) if captions else 0,
                "min": min(captions, default=0),
                "max": max(captions, default=0),
            },
            "suites": split_counts,
        },
        "licenses": licenses,
        "checksums": {
            rel: sha256_file(root / rel) for rel in sorted([*(str(p.relative_to(root)) for p in written), *TABLES])
        },
    }
    write_manifest(root, manifest)
    _say(
        f"built {len(items)} images into {len(written)} shards in {time.perf_counter() - start:.0f} s at {root}",
        progress,
    )
    return manifest
