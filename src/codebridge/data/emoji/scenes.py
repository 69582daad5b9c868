"""Stage 3: scenes of 2-4 emoji on a light canvas, a caption with spatial relations, boxes linked to words.

The parent plans every scene from one seeded RNG per scene (so results do not depend on the worker count);
workers render, measure the tight box of each object's visible pixels and write the caption from those boxes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from codebridge.data.emoji.canvas import Color, light_color, load_rgba, paste
from codebridge.data.emoji.concepts import STYLES, Concept
from codebridge.data.emoji.images import art_path
from codebridge.data.emoji.splits import split_of

CANVAS = 128
SIZES = (28, 48)  # object edge in pixels, inclusive
OBJECTS = (2, 4)  # objects per scene, inclusive
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends)


@dataclass(frozen=True)
class Placed:
    concept: int
    word: str
    art: str  # source PNG path
    x: int
    y: int
    size: int


@dataclass(frozen=True)
class ScenePlan:
    id: int
    split: str
    style: str
    file: str  # relative to the dataset root
    dst: str
    background: Color
    objects: tuple[Placed, ...]
    refs: tuple[int, ...]  # refs[j]: earlier object that object j (j >= 2) is related to in the caption


def _disjoint(a: Box, b: Box) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _layout(rng: random.Random, count: int) -> list[Box]:
    """``count`` non-overlapping squares of random size inside the canvas (rejection sampling, restarts if stuck)."""
    while True:
        boxes: list[Box] = []
        for _ in range(count):
            size = rng.randint(*SIZES)
            for _attempt in range(50):
                x, y = rng.randint(0, CANVAS - size), rng.randint(0, CANVAS - size)
                box = (x, y, x + size, y + size)
                if all(_disjoint(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            return boxes


def plan_scenes(
    concepts: list[Concept], packages: dict[str, Path], out: Path, count: int, seed: int
) -> list[ScenePlan]:
    """One plan per scene: distinct concepts, sizes, positions, background; train scenes google art, test twitter."""
    if len(concepts) < OBJECTS[0]:
        raise ValueError(f"scenes need at least {OBJECTS[0]} concepts, got {len(concepts)}; raise --limit")
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    plans = []
    for index in range(count):
        rng = random.Random(f"scene:{seed}:{index}")
        split = split_of(index, count)
        style = STYLES[0] if split == "train" else STYLES[1]
        chosen = rng.sample(concepts, rng.randint(OBJECTS[0], min(OBJECTS[1], len(concepts))))
        boxes = _layout(rng, len(chosen))
        objects = tuple(
            Placed(c.id, c.name, str(art_path(packages, style, c.art[0].image)), b[0], b[1], b[2] - b[0])
            for c, b in zip(chosen, boxes, strict=True)
        )
        refs = (0, 0, *(rng.randrange(j) for j in range(2, len(objects))))
        rel = f"scenes/{index:06d}.png"
        plans.append(ScenePlan(index, split, style, rel, str(out / rel), light_color(rng), objects, refs))
    return plans


def relation(a: Box, b: Box) -> str:
    """Where ``a`` lies relative to ``b``, along the axis on which their centres differ most."""
    dx = (a[0] + a[2]) - (b[0] + b[2])
    dy = (a[1] + a[3]) - (b[1] + b[3])
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(words: list[str], boxes: list[Box], refs: tuple[int, ...]) -> tuple[str, list[list[int]]]:
    """ "a dog face left of a pizza and a cat face below the pizza" and each word's [start, end) character span."""
    text = ""
    spans: list[list[int]] = [[0, 0] for _ in words]

    def mention(i: int) -> None:
        nonlocal text
        text += f"{_article(words[i])} "
        spans[i] = [len(text), len(text) + len(words[i])]
        text += words[i]

    mention(0)
    text += f" {relation(boxes[0], boxes[1])} "
    mention(1)
    for j in range(2, len(words)):
        text += " and "
        mention(j)
        text += f" {relation(boxes[j], boxes[refs[j]])} the {words[refs[j]]}"
    return text, spans


def render_scene(plan: ScenePlan) -> dict[str, Any]:
    """Worker: draw the scene, save it, return its scenes.jsonl row with tight boxes and caption spans."""
    canvas = Image.new("RGB", (CANVAS, CANVAS), plan.background)
    boxes: list[Box] = []
    for obj in plan.objects:
        art = load_rgba(obj.art, obj.size)
        paste(canvas, art, obj.x, obj.y)
        x0, y0, x1, y1 = art.getchannel("A").getbbox() or (0, 0, obj.size, obj.size)
        boxes.append((obj.x + x0, obj.y + y0, obj.x + x1, obj.y + y1))
    canvas.save(plan.dst, format="PNG")
    text, spans = caption([o.word for o in plan.objects], boxes, plan.refs)
    objects = [
        {"concept": o.concept, "word": o.word, "span": span, "box": list(box)}
        for o, span, box in zip(plan.objects, spans, boxes, strict=True)
    ]
    return {
        "id": plan.id,
        "split": plan.split,
        "style": plan.style,
        "file": plan.file,
        "caption": text,
        "objects": objects,
    }
