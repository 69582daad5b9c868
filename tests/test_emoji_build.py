"""The emoji builder for real (npm sources, espeak-ng, PyAV) on small subsets: determinism, idempotency, counts."""

from __future__ import annotations

import json
import os
import shutil
import time
import wave
from pathlib import Path

import pytest
from PIL import Image

from codebridge.cli import main
from codebridge.data.emoji.build import build_emoji
from codebridge.data.emoji.npm import MissingToolError
from codebridge.paths import codebridge_home, emoji_root

TINY = {"limit": 12, "n_scenes": 6, "n_clips": 16}  # 16 clips: every motion twice


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _lines(root: Path, table: str) -> list[dict]:
    return [json.loads(line) for line in (root / table).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_emoji(root, **TINY, workers=2, progress=False)
    return root


def test_same_seed_same_checksums_whatever_the_workers(tiny: Path, tmp_path: Path) -> None:
    again = build_emoji(tmp_path / "again", **TINY, workers=1, progress=False)
    assert again["checksums"] == _manifest(tiny)["checksums"]
    other = build_emoji(tmp_path / "other", **TINY, workers=1, seed=1, progress=False)
    differs = {rel for rel, digest in other["checksums"].items() if again["checksums"].get(rel) != digest}
    assert "scenes.jsonl" in differs and "splits.json" in differs
    assert not any(rel.startswith(("images/", "speech/")) for rel in differs)  # the seed only drives the random parts


def test_second_run_does_nothing(emoji_root: Path) -> None:
    manifest = _manifest(emoji_root)
    options = manifest["options"]
    before = {p: p.stat().st_mtime_ns for p in emoji_root.rglob("*")}
    start = time.perf_counter()
    again = build_emoji(
        emoji_root, limit=options["limit"], n_scenes=options["scenes"], n_clips=options["clips"], progress=False
    )
    assert time.perf_counter() - start < 5
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in emoji_root.rglob("*")} == before


def test_missing_or_changed_files_trigger_a_rebuild(tiny: Path) -> None:
    wav = tiny / "speech" / "v3" / sorted(os.listdir(tiny / "speech" / "v3"))[0]
    wav.unlink()
    clips = tiny / "clips.jsonl"
    clips.write_text(clips.read_text().replace("moving", "walking"))
    original = _manifest(tiny)
    rebuilt = build_emoji(tiny, **TINY, workers=1, progress=False)
    assert wav.is_file() and "walking" not in clips.read_text()
    assert rebuilt["checksums"] == original["checksums"]


def test_other_settings_rebuild_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build_emoji(root, limit=4, n_scenes=2, n_clips=1, workers=1, progress=False)
    second = build_emoji(root, limit=5, n_scenes=2, n_clips=1, workers=1, progress=False)
    assert second["counts"]["concepts"] == 5
    assert sorted(p.name for p in (root / "images" / "google").iterdir()) == sorted(
        Path(r["file"]).name for r in _lines(root, "images.jsonl") if r["style"] == "google"
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no emoji build"):
        build_emoji(foreign, limit=4, n_scenes=2, n_clips=1, workers=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_folder_the_builder_did_not_mark_is_never_cleared(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A web app's folder has a manifest.json too: `data emoji --out` refuses it, before fetching, deleting nothing."""
    app = tmp_path / "webapp"
    (app / "images").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my app", "icons": [{"src": "images/logo.png"}]}')
    (app / "images" / "logo.png").write_bytes(b"\x89PNG not really")
    before = {p: p.read_bytes() for p in app.rglob("*.*")}
    assert main(["data", "emoji", "--out", str(app), "--limit", "4", "--scenes", "2", "--clips", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {app} is not empty and holds no emoji build") and err.count("\n") == 1
    assert sorted(app.rglob("*")) == [app / "images", app / "images" / "logo.png", app / "manifest.json"]
    assert {p: p.read_bytes() for p in app.rglob("*.*")} == before


def test_counts_match_tables_and_files(emoji_root: Path) -> None:
    manifest = _manifest(emoji_root)
    counts = manifest["counts"]
    assert set(counts) == {"concepts", "images", "locales", "voices", "speech_files", "scenes", "clips"}
    concepts = _lines(emoji_root, "concepts.jsonl")
    images = _lines(emoji_root, "images.jsonl")
    speech = _lines(emoji_root, "speech.jsonl")
    assert counts["concepts"] == len(concepts) == manifest["options"]["limit"]
    assert counts["images"] == {s: sum(r["style"] == s for r in images) for s in ("google", "twitter")}
    assert counts["images"]["google"] > counts["concepts"]  # skin-tone variants are extra images
    assert counts["speech_files"] == len(speech) == counts["concepts"] * counts["voices"] == counts["concepts"] * 8
    assert counts["scenes"] == len(_lines(emoji_root, "scenes.jsonl"))
    assert counts["clips"] == len(_lines(emoji_root, "clips.jsonl"))
    assert all(set(c["labels"]) == set(c["tags"]) == {"en", "de", "fr", "es", "ja"} for c in concepts)
    assert counts["locales"] == 5
    assert len({c["group"] for c in concepts}) >= 8  # the subset spreads over the groups

    on_disk = {
        p.relative_to(emoji_root).as_posix()
        for p in emoji_root.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", ".codebridge-emoji", ".lock")
    }
    assert on_disk == set(manifest["checksums"])
    listed = [r["file"] for t in ("images", "speech", "scenes", "clips") for r in _lines(emoji_root, f"{t}.jsonl")]
    assert len(listed) == len(set(listed)) == len(on_disk) - 6  # + 5 jsonl tables + splits.json


def test_media_formats(emoji_root: Path) -> None:
    image = _lines(emoji_root, "images.jsonl")[-1]
    with Image.open(emoji_root / image["file"]) as img:
        assert (img.mode, img.size) == ("RGB", (64, 64))
    scene = _lines(emoji_root, "scenes.jsonl")[0]
    with Image.open(emoji_root / scene["file"]) as img:
        assert (img.mode, img.size) == ("RGB", (128, 128))
    with wave.open(str(emoji_root / _lines(emoji_root, "speech.jsonl")[0]["file"])) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (22050, 1)
        assert 0.3 < wav.getnframes() / 22050 < 5


def test_default_location_follows_codebridge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEBRIDGE_HOME", str(tmp_path))
    assert codebridge_home() == tmp_path
    assert emoji_root() == tmp_path / "emoji"
    monkeypatch.delenv("CODEBRIDGE_HOME")
    assert codebridge_home() == Path.home() / ".cache" / "codebridge"


def _path_with(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only links to the real ``tools``, so the builder runs unmocked without the others."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in tools:
        real = shutil.which(tool)
        assert real is not None, f"{tool} must be installed for this test"
        (folder / tool).symlink_to(real)
    return str(folder)


def test_missing_espeak_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_with(tmp_path))
    with pytest.raises(MissingToolError, match=r"espeak-ng not found on PATH.*apt-get install espeak-ng"):
        build_emoji(tmp_path / "out", limit=2, progress=False)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_missing_npm_is_reported_when_sources_must_be_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEBRIDGE_HOME", str(tmp_path / "home"))  # empty npm cache
    monkeypatch.setenv("PATH", _path_with(tmp_path, "espeak-ng"))
    with pytest.raises(MissingToolError, match=r"^npm not found on PATH.*`apt-get install npm`"):
        build_emoji(progress=False)


def test_cli_prints_the_missing_tool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CODEBRIDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", _path_with(tmp_path))
    assert main(["data", "emoji", "--limit", "3"]) == 2
    err = capsys.readouterr().err
    assert "espeak-ng and npm not found on PATH" in err
    assert "`apt-get install espeak-ng`" in err and "`apt-get install npm`" in err
