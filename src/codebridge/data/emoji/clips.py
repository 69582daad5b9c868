"""Stage 4: 12-frame 64x64 clips of one emoji moving, zooming or rotating, encoded as H.264 MP4 with PyAV.

Real video files (not frame folders) so the data layer decodes them exactly like user video; the codec runs
single-threaded and without macroblock-tree rate control, which makes the bytes reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from codebridge.data.emoji.canvas import Color, light_color, load_rgba, paste
from codebridge.data.emoji.concepts import STYLES, Concept
from codebridge.data.emoji.images import art_path
from codebridge.data.emoji.splits import split_of

FRAMES = 12
SIZE = 64
FPS = 12
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "zooming in",
    "zooming out",
    "rotating clockwise",
    "rotating counterclockwise",
)


@dataclass(frozen=True)
class ClipPlan:
    id: int
    split: str
    style: str
    file: str
    dst: str
    concept: int
    word: str
    art: str  # source PNG path
    motion: str
    size: int  # object edge for moves and rotations
    offset: int  # position across the direction of a move
    background: Color


def plan_clips(concepts: list[Concept], packages: dict[str, Path], out: Path, count: int, seed: int) -> list[ClipPlan]:
    """One plan per clip; motions cycle so every motion is equally common, concepts are drawn at random."""
    (out / "clips").mkdir(parents=True, exist_ok=True)
    plans = []
    for index in range(count):
        rng = random.Random(f"clip:{seed}:{index}")
        split = split_of(index, count)
        style = STYLES[0] if split == "train" else STYLES[1]
        concept = rng.choice(concepts)
        size = rng.randint(24, 36)
        rel = f"clips/{index:06d}.mp4"
        plans.append(
            ClipPlan(
                id=index,
                split=split,
                style=style,
                file=rel,
                dst=str(out / rel),
                concept=concept.id,
                word=concept.name,
                art=str(art_path(packages, style, concept.art[0].image)),
                motion=MOTIONS[index % len(MOTIONS)],
                size=size,
                offset=rng.randint(0, SIZE - size),
                background=light_color(rng),
            )
        )
    return plans


def _frame(plan: ClipPlan, art: Image.Image, t: float) -> Image.Image:
    """Frame at time ``t`` in [0, 1]."""
    canvas = Image.new("RGB", (SIZE, SIZE), plan.background)
    travel = SIZE - plan.size
    if plan.motion.startswith("moving"):
        along = round(t * travel)
        x, y = {
            "moving left": (travel - along, plan.offset),
            "moving right": (along, plan.offset),
            "moving up": (plan.offset, travel - along),
            "moving down": (plan.offset, along),
        }[plan.motion]
        paste(canvas, art.resize((plan.size, plan.size), Image.Resampling.LANCZOS), x, y)
    elif plan.motion.startswith("zooming"):
        scale = t if plan.motion == "zooming in" else 1 - t
        size = round(16 + scale * (56 - 16))
        paste(canvas, art.resize((size, size), Image.Resampling.LANCZOS), (SIZE - size) // 2, (SIZE - size) // 2)
    else:
        sign = -1 if plan.motion == "rotating clockwise" else 1  # PIL turns counterclockwise for positive angles
        big = art.resize((44, 44), Image.Resampling.LANCZOS)
        paste(canvas, big.rotate(sign * 330 * t, Image.Resampling.BICUBIC), 10, 10)
    return canvas


def render_clip(plan: ClipPlan) -> dict[str, Any]:
    """Worker: draw the frames, encode them to MP4, return the clips.jsonl row."""
    art = load_rgba(plan.art)
    with av.open(plan.dst, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.codec_context.thread_count = 1
        # mbtree off: with it, x264 output on these tiny frames depends on what the process encoded before.
        stream.options = {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        for i in range(FRAMES):
            pixels = np.asarray(_frame(plan, art, i / (FRAMES - 1)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return {
        "id": plan.id,
        "split": plan.split,
        "style": plan.style,
        "file": plan.file,
        "concept": plan.concept,
        "motion": plan.motion,
        "caption": f"{plan.word} {plan.motion}",
        "frames": FRAMES,
    }
