"""The built-in suites read from a real (small) build: splits, labels, no leakage, scene boxes, decodable clips."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from codebridge.data.emoji.clips import MOTIONS
from codebridge.data.emoji.scenes import relation
from codebridge.data.emoji.suites import SUITES, EmojiDataNotFound, class_names, load_suite
from codebridge.data.sample import Sample


def _concepts(samples: list[Sample]) -> set[int]:
    return {s.labels["concept"] for s in samples}


def _all_concepts(root: Path) -> set[int]:
    return {json.loads(line)["id"] for line in (root / "concepts.jsonl").read_text().splitlines()}


@pytest.mark.parametrize("name", SUITES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_suite_loads_with_unique_keys_and_real_sources(emoji_root: Path, name: str, split: str) -> None:
    samples = load_suite(name, split, root=emoji_root)
    assert samples
    assert len({s.key for s in samples}) == len(samples)
    for s in samples:
        table, line = s.source.removeprefix("emoji/").split(":")
        row = json.loads((emoji_root / table).read_text().splitlines()[int(line) - 1])
        media = s.media.get("audio") if table == "speech.jsonl" else s.media.get("video") or s.media.get("image")
        assert media == str((emoji_root / row["file"]).resolve())
        assert all(
            Path(p).is_absolute() and Path(p).is_file()
            for p in (s.media.get("image"), s.media.get("audio"), s.media.get("video"))
            if p
        )
        assert len(s.media.get("text", [])) == 1 and s.media.get("text", [])[0]
        assert all(isinstance(v, int) for v in s.labels.values())


def test_style_split_trains_on_google_with_skin_tones_and_tests_on_twitter(emoji_root: Path) -> None:
    train, test = load_suite("emoji-style", root=emoji_root), load_suite("emoji-style", "test", root=emoji_root)
    assert {s.meta["style"] for s in train} == {"google"} and {s.meta["style"] for s in test} == {"twitter"}
    assert _concepts(train) == _concepts(test) == _all_concepts(emoji_root)
    assert any(s.meta["skin"] for s in train) and not any(s.meta["skin"] for s in test)
    assert len(test) == len(_all_concepts(emoji_root))


def test_concept_split_holds_out_disjoint_concepts_in_both_styles(emoji_root: Path) -> None:
    train = load_suite("emoji-concept", "train", root=emoji_root)
    test = load_suite("emoji-concept", "test", root=emoji_root)
    assert _concepts(train).isdisjoint(_concepts(test))
    assert _concepts(train) | _concepts(test) == _all_concepts(emoji_root)
    assert 0 < len(_concepts(test)) < len(_concepts(train))
    assert {s.meta["style"] for s in train} == {s.meta["style"] for s in test} == {"google", "twitter"}


@pytest.mark.parametrize("name", ["emoji-voice", "emoji-trimodal"])
def test_voice_split_holds_out_voices_and_pairs_with_the_split_style(emoji_root: Path, name: str) -> None:
    train, test = load_suite(name, "train", root=emoji_root), load_suite(name, "test", root=emoji_root)
    train_voices, test_voices = {s.meta["voice"] for s in train}, {s.meta["voice"] for s in test}
    assert (len(train_voices), len(test_voices)) == (6, 2) and train_voices.isdisjoint(test_voices)
    assert all("/images/google/" in s.media.get("image") for s in train) and all(
        "/images/twitter/" in s.media.get("image") for s in test
    )
    n = len(_all_concepts(emoji_root))
    assert (len(train), len(test)) == (6 * n, 2 * n)
    assert all(s.has("image") and s.has("text") and s.has("audio") for s in train + test)


def test_labels_index_the_class_names(emoji_root: Path) -> None:
    names = {label: class_names(label, root=emoji_root) for label in ("concept", "group", "subgroup", "motion")}
    assert "smileys & emotion" in names["group"] and "face smiling" in names["subgroup"]
    assert all("-" not in n and n == n.lower() for n in names["group"] + names["subgroup"])
    assert names["motion"] == list(MOTIONS)
    for name in SUITES:
        for s in load_suite(name, "test", root=emoji_root):
            for label, value in s.labels.items():
                assert 0 <= value < len(names[label])
            if "concept" in s.labels and name != "emoji-clips":
                assert s.media.get("text", []) == [names["concept"][s.labels["concept"]]]
    with pytest.raises(ValueError, match="unknown emoji label 'colour'"):
        class_names("colour", root=emoji_root)


@pytest.mark.parametrize("split", ["train", "test"])
def test_scene_boxes_lie_in_the_canvas_and_spans_point_at_the_words(emoji_root: Path, split: str) -> None:
    for s in load_suite("emoji-scenes", split, root=emoji_root):
        assert s.labels == {} and s.meta["style"] == ("google" if split == "train" else "twitter")
        objects = s.meta["objects"]
        assert 2 <= len(objects) <= 4
        caption = s.media.get("text", [])[0]
        pixels = np.asarray(Image.open(s.media.get("image")))
        outside = np.ones(pixels.shape[:2], bool)
        for i, obj in enumerate(objects):
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            start, end = obj["span"]
            assert caption[start:end] == obj["word"]
            assert caption[:start].endswith(("a ", "an "))
            outside[y0:y1, x0:x1] = False
            for other in objects[i + 1 :]:
                a, b = obj["box"], other["box"]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "boxes overlap"
        first, second = objects[0], objects[1]
        assert caption[first["span"][1] :].startswith(f" {relation(first['box'], second['box'])} ")
        background = pixels[outside]
        assert (background == background[0]).all(), "art drawn outside its box"


def _ink(frame: np.ndarray) -> np.ndarray:
    """Pixels that differ clearly from the background (taken from the clip's corner)."""
    return np.abs(frame.astype(int) - frame[0, 0].astype(int)).sum(-1) > 60


@pytest.mark.parametrize("split", ["train", "test"])
def test_clips_decode_to_their_frame_count_and_move_as_captioned(emoji_root: Path, split: str) -> None:
    samples = load_suite("emoji-clips", split, root=emoji_root)
    for s in samples:
        with av.open(s.media.get("video")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == s.meta["frames"] == 12 and frames[0].shape == (64, 64, 3)
        motion = s.meta["motion"]
        assert s.media.get("text", [])[0].endswith(f" {motion}") and s.labels["motion"] == MOTIONS.index(motion)
        first, last = _ink(frames[0]), _ink(frames[-1])
        ys0, xs0 = np.nonzero(first)
        ys1, xs1 = np.nonzero(last)
        change = {
            "moving left": xs0.mean() - xs1.mean(),
            "moving right": xs1.mean() - xs0.mean(),
            "moving up": ys0.mean() - ys1.mean(),
            "moving down": ys1.mean() - ys0.mean(),
            "zooming in": last.sum() - first.sum(),
            "zooming out": first.sum() - last.sum(),
        }.get(motion, 1.0)
        assert change > 0, f"{s.key}: {motion} not visible"
    if split == "train":
        assert set(Counter(s.meta["motion"] for s in samples)) == set(MOTIONS)


def test_missing_data_and_bad_names_give_clear_errors(emoji_root: Path, tmp_path: Path) -> None:
    with pytest.raises(EmojiDataNotFound, match=r"emoji data not found at .*; build it with `codebridge data emoji`"):
        load_suite("emoji-style", root=tmp_path)
    with pytest.raises(ValueError, match="unknown emoji suite 'emoji-styles'; choose one of emoji-style"):
        load_suite("emoji-styles", root=emoji_root)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_suite("emoji-style", "val", root=emoji_root)


def test_root_may_be_the_codebridge_home(emoji_root: Path, tmp_path: Path) -> None:
    (tmp_path / "emoji").symlink_to(emoji_root)
    assert len(load_suite("emoji-style", "test", root=tmp_path)) == len(_all_concepts(emoji_root))
