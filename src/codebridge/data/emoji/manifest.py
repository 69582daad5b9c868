"""manifest.json: what was built from what, with a sha256 of every file; it is written last, so it marks completion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from codebridge.files import atomic_write_json, sha256_file

VERSION = 2  # bump when the builder's output changes, so older builds are rebuilt instead of trusted
TABLES = ("concepts.jsonl", "images.jsonl", "speech.jsonl", "scenes.jsonl", "clips.jsonl", "splits.json")
MANIFEST = "manifest.json"


def checksums(root: Path, relpaths: list[str], progress: bool = True) -> dict[str, str]:
    """relpath -> sha256, sorted by path so the manifest is byte-identical across equal builds."""
    files = tqdm(sorted(relpaths), desc="checksums", unit="file", disable=not progress)
    return {rel: sha256_file(root / rel) for rel in files}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(root / MANIFEST, manifest, indent=1, ensure_ascii=False)


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest, or None when the folder holds no complete build."""
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_build(
    root: Path, expected: dict[str, Any], rehash: tuple[str, ...] | None = TABLES
) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, "")`` when the build at ``root`` can be reused for ``expected`` settings, else ``(None, why)``.

    Cheap on purpose (a second run must be instant): every listed file must exist and the ``rehash`` files (every
    listed file when None) must match their checksums; the emoji build's media files are not re-hashed.
    """
    manifest = read_manifest(root)
    if manifest is None:
        return None, f"no readable {MANIFEST}"
    for key, value in expected.items():
        if manifest.get(key) != value:
            return None, f"built with {key}={manifest.get(key)!r}, asked for {value!r}"
    sums = manifest.get("checksums", {})
    missing = [rel for rel in sums if not (root / rel).is_file()]
    if missing:
        return None, f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    for table in sums if rehash is None else rehash:
        if table not in sums or sha256_file(root / table) != sums[table]:
            return None, f"{table} differs from its checksum in {MANIFEST}"
    return manifest, ""
