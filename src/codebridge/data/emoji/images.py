"""Stage 1: every concept's art in both styles (skin tones as extra images), 64x64 RGB on white."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codebridge.data.emoji.canvas import flatten, load_rgba
from codebridge.data.emoji.concepts import STYLES, Concept

SIZE = 64


def art_path(packages: dict[str, Path], style: str, image: str) -> Path:
    """The source PNG of one drawing inside the unpacked emoji-datasource package of ``style``."""
    return packages[f"emoji-datasource-{style}"] / "img" / style / str(SIZE) / image


def write_image(job: tuple[str, str]) -> None:
    """Worker: composite one source PNG on white and save it as RGB PNG (deterministic bytes)."""
    src, dst = job
    flatten(load_rgba(src, SIZE)).save(dst, format="PNG")


def plan_images(
    concepts: list[Concept], packages: dict[str, Path], out: Path
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """images.jsonl rows (style-major, CLDR order, base before skin tones) and the jobs that write them."""
    rows, jobs = [], []
    for style in STYLES:
        (out / "images" / style).mkdir(parents=True, exist_ok=True)
        for concept in concepts:
            for art in concept.art:
                rel = f"images/{style}/{art.image}"
                rows.append(
                    {"concept": concept.id, "style": style, "variant": art.hexcode, "skin": art.skin, "file": rel}
                )
                jobs.append((str(art_path(packages, style, art.image)), str(out / rel)))
    return rows, jobs
