"""Fused retrieval (continuous + w * discrete, w chosen on validation data only) against brute-force scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.eval.embed import PartItems
from codebridge.eval.fusion import FUSION_GRID, choose_weight, fused_embeddings, fused_metrics, fused_retrieval
from codebridge.eval.run import TaskNotAvailable, evaluate_model
from codebridge.models.model import CodeBridgeModel
from helpers import small_bridge_config
from test_localization import CAPTIONS, random_image

torch.set_num_threads(1)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def brute_force_ranks(scores: torch.Tensor, correct: list[set[int]]) -> list[int]:
    """1 + wrong items scoring at least the best correct one, query by query."""
    ranks = []
    for q, row in enumerate(scores.tolist()):
        best = max(row[j] for j in correct[q])
        ranks.append(1 + sum(1 for j, s in enumerate(row) if j not in correct[q] and s >= best))
    return ranks


def test_fused_score_equals_brute_force():
    images = PartItems(unit(5, 4, 0), unit(5, 6, 1), [[0], [1], [2], [3], [4]])
    texts = PartItems(unit(7, 4, 2), unit(7, 6, 3), [[0, 5], [1], [2, 6], [3], [4]])  # two images own 2 captions
    w = 0.7
    want = images.continuous @ texts.continuous.T + w * images.discrete @ texts.discrete.T
    got = fused_embeddings(images, w) @ fused_embeddings(texts, w).T
    assert torch.allclose(got, want, atol=1e-12)
    metrics = fused_metrics({"image": images, "text": texts}, w)
    owners = {0: 0, 5: 0, 1: 1, 2: 2, 6: 2, 3: 3, 4: 4}
    i2t = brute_force_ranks(want, [{t for t, i in owners.items() if i == q} for q in range(5)])
    t2i = brute_force_ranks(want.T, [{owners[t]} for t in range(7)])
    assert metrics["image_to_text_R@1"] == pytest.approx(sum(r <= 1 for r in i2t) / 5)
    assert metrics["text_to_image_mean_rank"] == pytest.approx(sum(t2i) / 7)


def split(discrete_helps: bool, seed: int) -> dict[str, PartItems]:
    """10 pairs; one part matches exactly, the other is noise, so the best w is large or 0."""
    n, rows = 10, [[i] for i in range(10)]
    match, noise_a, noise_b = unit(n, 8, seed), unit(n, 8, seed + 1), unit(n, 8, seed + 2)
    if discrete_helps:
        return {"image": PartItems(noise_a, match, rows), "text": PartItems(noise_b, match, rows)}
    return {"image": PartItems(match, noise_a, rows), "text": PartItems(match, noise_b, rows)}


def test_weight_is_chosen_on_validation_only():
    val, test = split(discrete_helps=True, seed=0), split(discrete_helps=False, seed=10)
    w_val, _ = choose_weight(val)
    w_test, _ = choose_weight(test)
    assert w_val > 0 and w_test == 0  # the optima differ
    out = fused_retrieval(val, test)
    assert out["fusion_weight"] == w_val and out["fusion_val_mean_R@1"] == 1.0
    assert out["fused_text_to_image_R@1"] == fused_metrics(test, w_val)["text_to_image_R@1"] < 1.0
    assert fused_metrics(test, 0.0)["text_to_image_R@1"] == 1.0  # what peeking at the test would have chosen
    assert fused_retrieval(val, split(discrete_helps=False, seed=20))["fusion_weight"] == w_val  # test-blind
    assert set(FUSION_GRID) >= {out["fusion_weight"]}


def write_jsonl(folder: Path, name: str, n: int, offset: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        path = folder / f"{name}{i}.png"
        random_image(16, 16, seed=offset + i).save(path)
        lines.append(json.dumps({"image": str(path), "text": CAPTIONS[(offset + i) % len(CAPTIONS)] + f" {i}"}))
    spec = folder / f"{name}.jsonl"
    spec.write_text("\n".join(lines) + "\n")
    return str(spec)


@pytest.mark.parametrize("bridge", ["codebook", "fdt", "clip"])
def test_evaluate_reports_fused_retrieval(bridge, tmp_path):
    cfg = small_bridge_config(bridge)
    torch.manual_seed(0)
    model = CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text)))
    val, test = write_jsonl(tmp_path, "val", 6, 0), write_jsonl(tmp_path, "test", 5, 100)
    if bridge == "clip":
        with pytest.raises(TaskNotAvailable, match="discrete part"):
            evaluate_model(model, test, "retrieval", batch_size=4, fuse_on=val)
        return
    out = evaluate_model(model, test, "retrieval", batch_size=4, fuse_on=val)
    assert out["fusion_weight"] in FUSION_GRID and "fused_text_to_image_R@1" in out
    assert out["fused_image_to_text_n_gallery"] == out["image_to_text_n_gallery"] == 5
