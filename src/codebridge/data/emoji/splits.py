"""splits.json: the three held-out axes of the benchmark (art style, concepts, voices)."""

from __future__ import annotations

import random
from typing import Any

from codebridge.data.emoji.concepts import STYLES, Concept
from codebridge.data.emoji.speech import TEST_VOICES, VOICES

TEST_FRACTION = 0.2


def split_of(index: int, total: int) -> str:
    """Scenes and clips: the first 80% of ids train, the rest test (each item is drawn independently at random)."""
    return "train" if index < round((1 - TEST_FRACTION) * total) else "test"


def concept_split(concepts: list[Concept], seed: int) -> dict[str, list[int]]:
    """Hold out a seeded 20% of each group's concepts, so every group is seen in train and tested on new members."""
    rng = random.Random(f"concept-split:{seed}")
    by_group: dict[int, list[int]] = {}
    for concept in concepts:
        by_group.setdefault(concept.row["group_id"], []).append(concept.id)
    test: list[int] = []
    for group in sorted(by_group):
        ids = by_group[group]
        rng.shuffle(ids)
        test += ids[: round(TEST_FRACTION * len(ids))]
    if not test and len(concepts) > 1:  # tiny subsets: still hold one concept out
        test = [rng.choice(concepts).id]
    held_out = set(test)
    return {"train": sorted(c.id for c in concepts if c.id not in held_out), "test": sorted(held_out)}


def make_splits(concepts: list[Concept], seed: int) -> dict[str, Any]:
    voices = [v.name for v in VOICES]
    return {
        "style": {"train": STYLES[0], "test": STYLES[1]},
        "concept": concept_split(concepts, seed),
        "voice": {"train": voices[:-TEST_VOICES], "test": voices[-TEST_VOICES:]},
    }
