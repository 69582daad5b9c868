"""``codebridge data emoji``: build the benchmark from the pinned npm sources and espeak-ng, idempotently.

Every random choice comes from an RNG seeded by (seed, stage, item), and every worker writes bytes that depend only
on its job, so the same seed gives the same checksums whatever the number of workers.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import av

from codebridge.data.emoji.clips import plan_clips, render_clip
from codebridge.data.emoji.concepts import STYLES, load_concepts
from codebridge.data.emoji.images import plan_images, write_image
from codebridge.data.emoji.manifest import (
    MANIFEST,
    TABLES,
    VERSION,
    check_build,
    checksums,
    write_manifest,
)
from codebridge.data.emoji.npm import PACKAGES, fetch_package, missing_packages, require_tools
from codebridge.data.emoji.parallel import Pool
from codebridge.data.emoji.records import write_jsonl
from codebridge.data.emoji.scenes import plan_scenes, render_scene
from codebridge.data.emoji.speech import VOICES, espeak_version, plan_speech, speak
from codebridge.data.emoji.splits import make_splits
from codebridge.data.emoji.text import LOCALES
from codebridge.files import atomic_write_text
from codebridge.lock import folder_lock
from codebridge.paths import codebridge_home, emoji_root

MARKER = ".codebridge-emoji"  # marks a folder this builder may clear, even before its first manifest exists
MEDIA = ("images", "speech", "scenes", "clips")


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _refuse_foreign(root: Path) -> None:
    """Refuse (touching nothing) a non-empty folder this builder did not mark.

    Only the marker counts: a ``manifest.json`` alone is no proof (web apps have one too).
    """
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        raise FileExistsError(
            f"{root} is not empty and holds no emoji build (no {MARKER} file), so nothing in it was changed; "
            "give `--out` a new or empty folder"
        )


def _clear(root: Path) -> None:
    """Remove the builder's own files (and only those) from a folder it marked."""
    (root / MANIFEST).unlink(missing_ok=True)
    for name in MEDIA:
        shutil.rmtree(root / name, ignore_errors=True)
    for table in TABLES:
        (root / table).unlink(missing_ok=True)


def build_emoji(
    out: Path | None = None,
    limit: int | None = None,
    n_scenes: int = 1200,
    n_clips: int = 1200,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or verify) the emoji benchmark at ``out`` (default ``$CODEBRIDGE_HOME/emoji``); return its manifest.

    ``limit`` keeps that many concepts spread evenly over CLDR order (every group stays represented).
    A folder already holding a complete build with the same settings is checked cheaply and left untouched.
    """
    if n_scenes < 0 or n_clips < 0:
        raise ValueError(f"n_scenes and n_clips must be >= 0, got {n_scenes} and {n_clips}")
    root = Path(out).expanduser() if out is not None else emoji_root()
    expected = {
        "version": VERSION,
        "seed": seed,
        "sources": {name: version for name, (version, _) in PACKAGES.items()},
        "options": {"limit": limit, "scenes": n_scenes, "clips": n_clips},
    }
    built, reason = check_build(root, expected)
    if built is None:
        _refuse_foreign(root)  # before anything is fetched or written
        cache = codebridge_home() / "npm"
        require_tools(["espeak-ng", *(["npm"] if missing_packages(cache) else [])])
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).touch()  # this folder is the builder's from now on
        with folder_lock(root, "emoji data folder", "give `--out` another folder"):
            built, reason = check_build(root, expected)  # a concurrent build may have just finished it
            if built is None:
                return _build(root, expected, reason, limit, n_scenes, n_clips, workers, seed, progress)
    _say(f"emoji data at {root} is complete (manifest checked); nothing to do", progress)
    return built


def _build(
    root: Path,
    expected: dict[str, Any],
    reason: str,
    limit: int | None,
    n_scenes: int,
    n_clips: int,
    workers: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Build into ``root`` (marked and locked by the caller) and return the manifest, written last."""
    _say(f"building emoji data at {root} ({reason})", progress)
    cache = codebridge_home() / "npm"
    start = time.perf_counter()
    packages = {name: fetch_package(name, cache) for name in PACKAGES}
    concepts = load_concepts(packages, limit)
    _clear(root)

    with Pool(workers, progress) as pool:
        image_rows, jobs = plan_images(concepts, packages, root)
        pool.map(write_image, jobs, "images")
        speech_rows, jobs = plan_speech(concepts, root)
        pool.map(speak, jobs, "speech")
        scene_rows = pool.map(render_scene, plan_scenes(concepts, packages, root, n_scenes, seed), "scenes")
        clip_rows = pool.map(render_clip, plan_clips(concepts, packages, root, n_clips, seed), "clips")

    write_jsonl(root / "concepts.jsonl", (c.row for c in concepts))
    write_jsonl(root / "images.jsonl", image_rows)
    write_jsonl(root / "speech.jsonl", speech_rows)
    write_jsonl(root / "scenes.jsonl", scene_rows)
    write_jsonl(root / "clips.jsonl", clip_rows)
    atomic_write_text(root / "splits.json", json.dumps(make_splits(concepts, seed)) + "\n")

    media = [row["file"] for rows in (image_rows, speech_rows, scene_rows, clip_rows) for row in rows]
    manifest = {
        **expected,
        "tools": {"espeak-ng": espeak_version(), "av": av.__version__},
        "counts": {
            "concepts": len(concepts),
            "images": {style: sum(r["style"] == style for r in image_rows) for style in STYLES},
            "locales": len(LOCALES),
            "voices": len(VOICES),
            "speech_files": len(speech_rows),
            "scenes": len(scene_rows),
            "clips": len(clip_rows),
        },
        "checksums": checksums(root, [*media, *TABLES], progress),
    }
    write_manifest(root, manifest)
    _say(f"built {len(manifest['checksums'])} files in {time.perf_counter() - start:.0f} s at {root}", progress)
    return manifest
