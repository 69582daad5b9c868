"""``codebridge data corpus`` on a tiny offline corpus: every npm package it reads is written here as a fixture
(emojibase, both emoji-datasource styles, two Iconify emoji sets, an icon set with categories, flags, emojilib,
country names), so the default suite never touches the network. A real npm build is the ``slow`` test at the end.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codebridge.cli import main
from codebridge.config import DataConfig
from codebridge.data.corpus.build import build_corpus
from codebridge.data.corpus.sets import SETS, ArtSet, LicenseError, select
from codebridge.data.corpus.suites import suite_folder
from codebridge.data.emoji.npm import PACKAGES, package_dir
from codebridge.data.sample import Sample
from codebridge.data.sources import open_source

# (hexcode, en label, group, subgroup, tags): three CLDR groups of three, so the concept split holds one of each out.
CONCEPTS = [
    ("1F600", "grinning face", 0, 0, ["face", "grin"]),
    ("1F603", "grinning face with big eyes", 0, 0, ["face", "mouth"]),
    ("1F60D", "smiling face with heart-eyes", 0, 1, ["eye", "love"]),
    ("1F431", "cat face", 3, 10, ["cat", "pet"]),
    ("1F436", "dog face", 3, 10, ["dog", "pet"]),
    ("1F98A", "fox", 3, 10, ["face"]),
    ("1F34E", "red apple", 4, 20, ["apple", "fruit"]),
    ("1F34C", "banana", 4, 20, ["fruit"]),
    ("1F355", "pizza", 4, 21, ["cheese"]),
]
LOCALES = ("en", "de", "fr", "es", "ja")
FIXTURE_SETS = ("google", "twitter", "fluent-emoji-flat", "noto-v1", "game-icons", "flag")
TEST_SETS = tuple(art for art in SETS if art.name in FIXTURE_SETS)


def _package(cache: Path, name: str, version: str) -> Path:
    root = package_dir(name, cache, (version, ()))
    (root / "package").mkdir(parents=True)
    (root / ".unpacked").write_text(f"{name}@{version}\n")
    return root / "package"


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _circle(x: int, color: str) -> str:
    return f'<circle cx="{x}" cy="16" r="6" fill="{color}"/><rect x="2" y="26" width="28" height="4" fill="#333"/>'


def _iconify(cache: Path, art: ArtSet, icons: dict, aliases: dict, chars: dict, categories: dict, **box: int) -> None:
    folder = _package(cache, art.package, art.version)
    _json(folder / "icons.json", {"prefix": art.name, "icons": icons, "aliases": aliases, **box})
    _json(folder / "info.json", {"name": art.name, "license": {"title": art.license, "spdx": art.license}})
    _json(folder / "package.json", {"name": art.package, "version": art.version, "license": art.license})
    _json(folder / "chars.json", chars)
    _json(folder / "metadata.json", {"categories": categories} if categories else {})


def write_packages(cache: Path) -> None:
    """Every package the corpus reads, tiny and offline, at the pinned versions (so the fetcher finds them)."""
    emojibase = _package(cache, "emojibase-data", PACKAGES["emojibase-data"][0])
    for locale in LOCALES:
        rows = [
            {
                "hexcode": hexcode,
                "emoji": "".join(chr(int(h, 16)) for h in hexcode.split("-")),
                "label": label if locale == "en" else f"{label} ({locale})",
                "group": group,
                "subgroup": subgroup,
                "order": order,
                "tags": tags,
            }
            for order, (hexcode, label, group, subgroup, tags) in enumerate(CONCEPTS)
        ]
        _json(emojibase / locale / "data.json", rows)
    groups = {str(g): f"group-{g}" for g in (0, 3, 4)}
    _json(
        emojibase / "meta" / "groups.json",
        {"groups": groups, "subgroups": {str(s): f"sub-{s}" for s in (0, 1, 10, 20, 21)}},
    )
    for style, shade in (("google", 40), ("twitter", 200)):
        folder = _package(cache, f"emoji-datasource-{style}", PACKAGES[f"emoji-datasource-{style}"][0])
        entries = []
        for index, (hexcode, label, *_) in enumerate(CONCEPTS):
            image = f"{hexcode.lower()}.png"
            entries.append({"unified": hexcode, "image": image, "name": label.upper(), "short_names": []})
            png = folder / "img" / style / "64" / image
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGBA", (64, 64), (shade, 20 * index, 100, 255)).save(png)
        _json(folder / "emoji.json", entries)
    emojilib = _package(cache, "emojilib", "4.0.3")
    _json(emojilib / "dist" / "emoji-en-US.json", {"\U0001f600": ["grinning_face", "smile", "happy", ":D"]})
    countries = _package(cache, "i18n-iso-countries", "7.14.0")
    names = {"DE": "Germany", "FR": "France", "JP": "Japan", "US": ["United States of America", "USA"]}
    for locale in LOCALES:
        local = {code: name if locale == "en" else f"{code}-{locale}" for code, name in names.items()}
        _json(countries / "langs" / f"{locale}.json", {"locale": locale, "countries": local})

    arts = {art.name: art for art in SETS}
    # Fluent: code points in chars.json; "dog-face" is the cat mirrored (an alias with hFlip).
    fluent = {"grinning": _circle(8, "#fc0"), "cat-face": _circle(8, "#f80"), "red-apple": _circle(16, "#f00")}
    _iconify(
        cache,
        arts["fluent-emoji-flat"],
        {name: {"body": body} for name, body in fluent.items()},
        {"dog-face": {"parent": "cat-face", "hFlip": True}, "smiley": {"parent": "grinning"}},
        {"1f600": "grinning", "1f431": "cat-face", "1f436": "dog-face", "1f34e": "red-apple"},
        {},
        width=32,
        height=32,
    )
    # Noto v1: no chars.json, names only; "banana-2" counts for banana, "face" is no concept.
    noto = {"grinning-face": "#ee0", "fox": "#f60", "banana-2": "#ff0", "pizza": "#c60", "face": "#000"}
    _iconify(
        cache,
        arts["noto-v1"],
        {name: {"body": _circle(20, color)} for name, color in noto.items()},
        {},
        {},
        {},
        width=32,
        height=32,
    )
    game = ["crossed-swords", "bow-arrow", "wolf-head", "cat", "treasure-map"]
    _iconify(
        cache,
        arts["game-icons"],
        {name: {"body": _circle(4 + 5 * i, "currentColor")} for i, name in enumerate(game)},
        {"sword": {"parent": "crossed-swords"}},
        {},
        {"Weapons": ["crossed-swords", "bow-arrow"], "Animals": ["wolf-head", "cat"]},
        width=32,
        height=32,
    )
    flags = {
        f"{code}-4x3": {"body": f'<rect width="640" height="480" fill="{c}"/>'}
        for code, c in (("de", "#000"), ("fr", "#00f"), ("jp", "#fff"))
    }
    _iconify(cache, arts["flag"], flags, {}, {}, {}, width=640, height=480)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A codebridge home whose npm cache holds the fixture packages (npm is never run)."""
    monkeypatch.setenv("CODEBRIDGE_HOME", str(tmp_path / "home"))
    write_packages(tmp_path / "home" / "npm")
    return tmp_path / "home"


def build(out: Path, **options: object) -> dict:
    return build_corpus(out, **{"workers": 1, "progress": False, "sets": TEST_SETS, **options})


def read(root: Path, suite: str, split: str) -> list[Sample]:
    return open_source(str(root / suite / split), DataConfig())


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def test_counts_licenses_and_readable_shards(home: Path, tmp_path: Path) -> None:
    manifest = build(tmp_path / "c")
    counts = manifest["counts"]
    assert counts["concepts"] == 9
    assert counts["images"] == {
        "google": 9,
        "twitter": 9,
        "fluent-emoji-flat": 4,
        "noto-v1": 4,
        "game-icons": 5,
        "flag": 3,
    }
    assert (counts["icons"], counts["flags"]) == (5, 3)
    licenses = {row["set"]: row["license"] for row in json.loads((tmp_path / "c" / "licenses.json").read_text())}
    assert licenses == {art.name: art.license for art in TEST_SETS}
    for suite, splits in counts["suites"].items():
        for split, count in splits.items():
            samples = read(tmp_path / "c", suite, split)
            assert len(samples) == count > 0
            assert all(Image.open(io.BytesIO(s.media["image"])).size == (64, 64) for s in samples)
            assert all(s.meta["license"] == licenses[s.meta["style"]] for s in samples)


def test_second_run_checks_and_returns_and_an_edit_rebuilds(home: Path, tmp_path: Path, capsys) -> None:
    first = build(tmp_path / "c")
    shard = next((tmp_path / "c" / "corpus-style" / "test").glob("*.tar"))
    stamp = shard.stat().st_mtime_ns
    assert build(tmp_path / "c", progress=True) == first
    assert "nothing to do" in capsys.readouterr().err
    assert shard.stat().st_mtime_ns == stamp
    shard.write_bytes(shard.read_bytes()[:-1024])  # a damaged shard is noticed and rebuilt
    assert build(tmp_path / "c") == first
    assert shard.stat().st_mtime_ns != stamp
    assert build(tmp_path / "c", size=32)["options"]["size"] == 32  # a changed option rebuilds


def test_same_seed_gives_byte_identical_shards_and_manifest(home: Path, tmp_path: Path) -> None:
    one = files((build(tmp_path / "a"), tmp_path / "a")[1])
    two = files((build(tmp_path / "b", workers=2), tmp_path / "b")[1])
    assert one == two
    build(tmp_path / "d", seed=1)
    assert files(tmp_path / "d") != one


def test_reserved_sets_are_refused_before_anything_is_fetched(home: Path, tmp_path: Path) -> None:
    with pytest.raises(LicenseError, match="reserved"):
        select(["openmoji"])
    reserved = ArtSet("openmoji", "@iconify-json/openmoji", "1.0.0", "CC-BY-SA-4.0", "emoji", "emoji", "x")
    for art in (reserved, replace(reserved, name="stamps", package="tuxpaint-stamps")):
        with pytest.raises(LicenseError, match="independent evaluation"):
            build(tmp_path / "c", sets=(*TEST_SETS, art))
    assert not (tmp_path / "c").exists()
    assert main(["data", "corpus", "--out", str(tmp_path / "c"), "--styles", "OpenMoji"]) == 2


def test_unclear_image_license_is_refused(home: Path, tmp_path: Path) -> None:
    info = home / "npm" / "@iconify-json+noto-v1-1.2.5" / "package" / "info.json"
    _json(info, {"name": "noto-v1"})  # no license field
    with pytest.raises(LicenseError, match=r"@iconify-json/noto-v1: info.json declares license None"):
        build(tmp_path / "c")


def test_style_splits_hold_their_style_out_of_training(home: Path, tmp_path: Path) -> None:
    build(tmp_path / "c")
    for suite, held_out in (("corpus-style", "twitter"), ("corpus-style-noto", "noto-v1")):
        train, test = read(tmp_path / "c", suite, "train"), read(tmp_path / "c", suite, "test")
        assert {s.meta["style"] for s in test} == {held_out}
        assert held_out not in {s.meta["style"] for s in train}
        assert len({s.meta["style"] for s in train}) == 3
    assert len(read(tmp_path / "c", "corpus-style", "test")) == len(CONCEPTS)  # every concept is a candidate


def test_concept_and_icon_splits_are_disjoint(home: Path, tmp_path: Path) -> None:
    build(tmp_path / "c")
    for suite in ("corpus-concept", "corpus-icons"):
        train = {s.labels["concept"] for s in read(tmp_path / "c", suite, "train")}
        test = {s.labels["concept"] for s in read(tmp_path / "c", suite, "test")}
        assert train and test and not train & test
    held_out = {s.labels["group"] for s in read(tmp_path / "c", "corpus-concept", "test")}
    assert held_out == {0, 1, 2}  # one concept of each CLDR group


def test_captions_are_varied_and_multilingual(home: Path, tmp_path: Path) -> None:
    build(tmp_path / "c")
    samples = read(tmp_path / "c", "corpus-style", "test")
    grinning = next(s for s in samples if s.meta["hexcode"] == "1F600")
    assert grinning.media["text"][0] == "grinning face"
    assert {"an emoji of grinning face", "face, grin", "grinning face: smile, happy", "grinning face (ja)"} <= set(
        grinning.media["text"]
    )
    icons = read(tmp_path / "c", "corpus-icons", "train") + read(tmp_path / "c", "corpus-icons", "test")
    swords = next(s for s in icons if s.meta["name"] == "crossed-swords")
    assert swords.media["text"] == [
        "crossed swords",
        "a game icon of crossed swords",
        "a picture of crossed swords",
        "crossed swords (weapons)",
    ]
    germany = next(s for s in icons if s.meta.get("country") == "DE")
    assert germany.media["text"][0] == "flag of Germany" and "DE-ja" in germany.media["text"]
    assert all(len(s.media["text"]) == len(set(s.media["text"])) >= 3 for s in samples + icons)


def test_iconify_names_and_aliases_map_to_concepts(home: Path, tmp_path: Path) -> None:
    build(tmp_path / "c")
    train = read(tmp_path / "c", "corpus-style", "train")
    by = {(s.meta["style"], s.meta["hexcode"]): s for s in train}
    assert {h for style, h in by if style == "noto-v1"} == {"1F600", "1F98A", "1F34C", "1F355"}
    cat = np.asarray(Image.open(io.BytesIO(by["fluent-emoji-flat", "1F431"].media["image"])))
    dog = np.asarray(Image.open(io.BytesIO(by["fluent-emoji-flat", "1F436"].media["image"])))
    assert not np.array_equal(cat, dog) and np.array_equal(cat[:, ::-1], dog)


def test_suite_names_resolve_to_shard_folders(home: Path, tmp_path: Path) -> None:
    build(tmp_path / "c")
    assert suite_folder("corpus-style:test", tmp_path / "c") == tmp_path / "c" / "corpus-style" / "test"
    with pytest.raises(ValueError, match="unknown corpus suite"):
        suite_folder("corpus-nope", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="codebridge data corpus"):
        suite_folder("corpus-style", tmp_path / "empty")
    by_name = open_source("corpus-style:test", DataConfig(root=str(tmp_path / "c")))  # the registered source
    by_folder = open_source(str(tmp_path / "c" / "corpus-style" / "test"), DataConfig())
    assert by_name and [s.key for s in by_name] == [s.key for s in by_folder]


def test_foreign_folder_is_left_untouched(home: Path, tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no corpus build"):
        build(tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_real_npm_build_of_a_few_concepts(tmp_path: Path) -> None:
    """The real packages from the npm registry (cached in $CODEBRIDGE_HOME/npm after the first run)."""
    counts = build_corpus(tmp_path / "c", limit=12, workers=2, progress=False)["counts"]
    assert counts["concepts"] == 12 and counts["images"]["twitter"] == 12
    assert all(counts["images"][art.name] > 0 for art in SETS)
