import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codebridge.config import ConfigError, DataConfig
from codebridge.data.emoji.suites import load_suite
from codebridge.data.sample import Sample
from codebridge.data.sources import source_for
from codebridge.eval.codes import (
    Assignments,
    TopPatches,
    code_metrics,
    concept_agreement,
    evaluate_codes,
    grid_rows,
    label_metrics,
    patch_crop,
    perplexity,
    purity,
)
from test_localization import tiny_model

torch.set_num_threads(1)


def entropy(x: np.ndarray) -> float:
    p = np.unique(x, return_counts=True)[1] / len(x)
    return float(-(p * np.log(p)).sum())


def test_purity_and_nmi_of_a_constructed_assignment() -> None:
    codes = np.array([0, 0, 1, 1, 2, 2])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert purity(codes, labels) == pytest.approx(5 / 6)  # majorities: 2 + 1 + 2 of 6
    # MI by hand: H(labels) - H(labels | codes); codes 0 and 2 are pure, code 1 is a 50/50 split (log 2), weight 1/3
    mutual = entropy(labels) - math.log(2) / 3
    nmi = mutual / ((entropy(codes) + entropy(labels)) / 2)  # arithmetic normalisation, sklearn's default
    metrics = label_metrics(codes, labels, "concept")
    assert metrics == {"codes_nmi_concept": pytest.approx(nmi), "codes_purity_concept": pytest.approx(5 / 6)}
    renamed = label_metrics(np.array([7, 7, 3, 3, 9, 9]), labels + 4, "group", "_image")
    assert renamed == {"codes_nmi_group_image": pytest.approx(nmi), "codes_purity_group_image": pytest.approx(5 / 6)}


def test_unlabelled_positions_are_left_out_and_perfect_codes_score_one() -> None:
    codes = np.array([3, 3, 5, 5, 8])
    labels = np.array([1, 1, 0, 0, -1])
    assert label_metrics(codes, labels, "concept") == {"codes_nmi_concept": 1.0, "codes_purity_concept": 1.0}
    assert label_metrics(codes, np.full(5, -1), "concept") == {}
    with pytest.raises(ValueError, match="no positions"):
        purity(np.array([], dtype=int), np.array([], dtype=int))


def test_concept_agreement_counts_concepts_with_the_same_dominant_code_everywhere() -> None:
    codes = np.array([4, 4, 1, 4, 2, 2, 3, 9, 9])
    modality = np.array([0, 0, 0, 1, 0, 1, 1, 0, 0])
    concept = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    # concept 0: image 4 (2 of 3), text 4 -> agree; concept 1: image 2, text 2 or 3 tied -> smallest 2 -> agree;
    # concept 2: image only -> not counted
    assert concept_agreement(codes, modality, concept) == 1.0
    codes[3] = 7
    assert concept_agreement(codes, modality, concept) == 0.5
    assert concept_agreement(codes, np.zeros(9, dtype=int), concept) is None


def test_perplexity_and_usage_metrics() -> None:
    assert perplexity(np.array([5, 5, 5, 5, 0])) == pytest.approx(4.0)
    found = Assignments(["image", "text"], num_codes=10)
    found.add("image", np.array([0, 0, 1, 1]), np.array([5, 5, 6, 6]))
    found.add("text", np.array([1, 2, 1]), np.array([5, -1, 6]), token=np.array([10, 11, 12]))
    metrics = code_metrics(found, {5: 0, 6: 1})
    assert metrics["codes_used"] == 3 and metrics["codes_used_fraction"] == 0.3
    assert metrics["codes_used_image"] == 2 and metrics["codes_used_text"] == 2
    assert metrics["codes_positions"] == 7 and metrics["codes_labelled_positions"] == 6
    assert metrics["codes_purity_concept"] == pytest.approx(5 / 6)  # code 0: 5, 5; code 1: 6, 6, 5, 6
    assert metrics["codes_purity_concept_image"] == 1.0
    assert metrics["codes_concept_agreement"] == 0.5  # concept 6 agrees on code 1, concept 5 does not


def test_top_patches_keep_the_best_image_per_code_across_batches() -> None:
    top = TopPatches(num_codes=2, top=2, grid=2)
    first = torch.tensor([[[0.1, 0.9], [0.5, 0.0], [0.2, 0.0], [0.0, 0.0]]])  # image 0
    second = torch.tensor([[[0.7, 0.1], [0.0, 0.2], [0.0, 0.0], [0.0, 0.3]], [[0.0, 0.0]] * 4])  # images 1, 2
    top.add(first, 0)
    top.add(second, 1)
    assert top.where[0].tolist() == [[1, 0], [0, 1]] and top.scores[0].tolist() == pytest.approx([0.7, 0.5])
    assert top.where[1].tolist() == [[0, 0], [1, 3]]  # one patch per image, even when image 0 has two good ones
    samples = [Sample(key=f"k{i}", source="t", media={"image": f"{i}.png"}) for i in range(3)]
    entries = top.entries(1, samples)
    assert entries[1] == {"index": 1, "sample": "k1", "image": "1.png", "row": 1, "col": 1, "score": pytest.approx(0.3)}


def test_patch_crop_outlines_the_patch_in_a_square_window() -> None:
    image = Image.new("RGB", (40, 40), (255, 255, 255))  # grid 4: 10 px patches; window 3 x 3 patches = 30 px
    corner = np.asarray(patch_crop(image, grid=4, row=0, col=0, context=1, size=30))
    assert corner.shape == (30, 30, 3)
    assert tuple(corner[0, 5]) == (255, 0, 0) and tuple(corner[9, 5]) == (255, 0, 0)  # patch at the window's corner
    assert tuple(corner[20, 20]) == (255, 255, 255)
    far = np.asarray(patch_crop(image, grid=4, row=3, col=3, context=1, size=30))  # window shifted inward
    assert tuple(far[29, 25]) == (255, 0, 0) and tuple(far[20, 25]) == (255, 0, 0) and tuple(far[5, 5]) == (255,) * 3


def test_grid_rows_put_codes_shared_by_modalities_first() -> None:
    def entry(code: int, image: int, text: int) -> dict:
        return {"code": code, "count_by_modality": {"image": image, "text": text}, "top_patches": [{}] * (image > 0)}

    table = [entry(0, 50, 0), entry(1, 9, 3), entry(2, 0, 40), entry(3, 5, 1), entry(4, 4, 0)]
    assert [e["code"] for e in grid_rows(table, 3)] == [1, 3, 0]


@pytest.mark.parametrize("bridge", ["codebook", "fdt"])
def test_evaluate_codes_on_built_scenes_writes_the_table_and_grid(emoji_root: Path, tmp_path: Path, bridge) -> None:
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:10]
    model = tiny_model(bridge, [s.media.get("text", [])[0] for s in scenes])
    groups = source_for("emoji-scenes:test", DataConfig(root=str(emoji_root))).concept_groups()
    assert groups[scenes[0].meta["objects"][0]["concept"]] >= 0
    metrics = evaluate_codes(model, scenes, tmp_path, groups=groups, batch_size=4, top=3, rows=4)
    assert metrics["codes_positions"] == 10 * 16 + sum(
        len(model.tokenizer.encode(s.media.get("text", []))[1][0].nonzero()) for s in scenes
    )
    assert 0 < metrics["codes_labelled_positions"] < metrics["codes_positions"]  # background and "left of" unlabelled
    for key in ("codes_nmi_concept", "codes_purity_concept", "codes_nmi_group", "codes_purity_group"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["codes_purity_group"] >= metrics["codes_purity_concept"]  # groups merge concepts
    table = json.loads((tmp_path / "codes.json").read_text())
    assert len(table["usage"]) == 16 and sum(table["usage"]) == metrics["codes_positions"]
    assert len(table["codes"]) == metrics["codes_used"]
    first = table["codes"][0]
    assert first["count"] == max(table["usage"]) and len(first["top_patches"]) == 3
    assert {"row", "col", "image", "sample"} <= first["top_patches"][0].keys()
    with Image.open(tmp_path / "codes_grid.png") as grid:
        assert grid.format == "PNG"


def test_clip_has_no_codes_to_analyse() -> None:
    model = tiny_model("clip", ["a dog"])
    with pytest.raises(ConfigError, match="no codes or tokens"):
        evaluate_codes(model, [Sample(key="0", source="t", media={"image": "x.png", "text": ["a dog"]})])
