"""Chunked retrieval metrics against a plain full-matrix reference, and the retrieval task end to end.

``tiny_model`` and ``write_jsonl`` are shared with test_zeroshot.py and test_linear_probe.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codebridge.config import ConfigError
from codebridge.data.dataset import all_texts
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.eval.retrieval import (
    bidirectional_retrieval,
    caption_pairs,
    median_rank,
    retrieval_metrics,
    retrieval_ranks,
)
from codebridge.eval.run import TaskNotAvailable, evaluate, evaluate_model
from codebridge.models.model import CodeBridgeModel
from helpers import small_config

torch.set_num_threads(1)


def tiny_model(modalities: list[str], texts: list[str], root: Path | None = None) -> CodeBridgeModel:
    """An untrained model small enough to embed a few hundred 16x16 images in a second; ``root``: emoji data."""
    cfg = small_config()
    cfg.data.root = None if root is None else str(root)
    cfg.eval.chunk_size = 7  # several chunks even on tiny data
    torch.manual_seed(0)
    return CodeBridgeModel(cfg, modalities, Preprocessors(cfg.prep, Tokenizer.train(texts, cfg.prep.text)))


def write_jsonl(folder: Path, rows: list[dict]) -> Path:
    """A JSONL data file; every "image" names a small random PNG that is created next to it."""
    rng = np.random.default_rng(0)
    for row in rows:
        if "image" in row and not (folder / row["image"]).exists():
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / row["image"])
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reference_ranks(query: torch.Tensor, gallery: torch.Tensor, positives: torch.Tensor) -> list[int]:
    """Sort the whole score matrix; among equal scores put wrong items first (ties count against the query)."""
    scores = (query.double() @ gallery.double().T).numpy()
    correct = np.zeros(scores.shape, dtype=bool)
    correct[positives[:, 0].numpy(), positives[:, 1].numpy()] = True
    ranks = []
    for row, hits in zip(scores, correct, strict=True):
        order = np.lexsort((hits, -row))  # primary key: score descending; then wrong before correct
        ranks.append(int(np.flatnonzero(hits[order])[0]) + 1)
    return ranks


def reference_metrics(ranks: list[int], prefix: str) -> dict[str, float]:
    r = np.array(ranks)
    metrics = {f"{prefix}_R@{k}": float(np.mean(r <= k)) for k in (1, 5, 10)}
    metrics[f"{prefix}_median_rank"] = float(np.floor(np.median(r - 1)) + 1)  # OpenCLIP, on 0-based ranks
    metrics[f"{prefix}_mean_rank"] = float(np.mean(r))
    return metrics


def coco_like(n_items: int, captions: int, dim: int = 8, noise: float = 1.0, seed: int = 0):
    """Items with ``captions`` noisy captions each: (items [N, E], captions [N*c, E], item of each caption)."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n_items, dim, generator=g)
    owner = torch.arange(n_items).repeat_interleave(captions)
    texts = items[owner] + noise * torch.randn(len(owner), dim, generator=g)
    return items, texts, owner


def test_single_positive_matches_reference() -> None:
    images, texts, owner = coco_like(60, 1)
    pairs = caption_pairs(owner)
    got = retrieval_metrics(texts, images, pairs.flip(1), chunk_size=7, prefix="text_to_image")
    want = reference_metrics(reference_ranks(texts, images, pairs.flip(1)), "text_to_image")
    assert got == pytest.approx({**want, "text_to_image_n_queries": 60, "text_to_image_n_gallery": 60})
    assert 0 < got["text_to_image_R@1"] < 1  # the data is neither trivial nor hopeless


def test_several_captions_per_image_both_directions() -> None:
    images, texts, owner = coco_like(40, 5, noise=1.5)
    pairs = caption_pairs(owner)  # (image, caption)
    got = bidirectional_retrieval(images, texts, pairs, names=("image", "text"), chunk_size=9)
    i2t = reference_ranks(images, texts, pairs)
    t2i = reference_ranks(texts, images, pairs.flip(1))
    assert got == pytest.approx(
        {
            **reference_metrics(i2t, "image_to_text"),
            **reference_metrics(t2i, "text_to_image"),
            "image_to_text_n_queries": 40,
            "image_to_text_n_gallery": 200,
            "text_to_image_n_queries": 200,
            "text_to_image_n_gallery": 40,
        }
    )
    # image->text takes the best of five captions: it must beat the rank of each single caption
    single = retrieval_ranks(images, texts, pairs[::5])
    assert (retrieval_ranks(images, texts, pairs) <= single).all()
    assert (retrieval_ranks(images, texts, pairs) < single).any()


@pytest.mark.parametrize("chunk_size", [1, 3, 17, 64, 1000])
def test_chunked_equals_unchunked(chunk_size: int) -> None:
    images, texts, owner = coco_like(64, 3, noise=2.0, seed=1)
    pairs = caption_pairs(owner)
    full = retrieval_ranks(images, texts, pairs, chunk_size=len(images))
    assert torch.equal(retrieval_ranks(images, texts, pairs, chunk_size=chunk_size), full)


def test_ties_with_wrong_items_count_against_the_query() -> None:
    # integer embeddings: scores are exact, so ties are real ties
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    positives = torch.tensor([[0, 1], [1, 0], [1, 1], [2, 4]])
    ranks = retrieval_ranks(query, gallery, positives, chunk_size=2)
    # query 0: item 2 scores higher (2 > 1) and wrong item 0 ties with its positive item 1: both count
    # query 1: both positives tie (score 1) and neither counts, item 2 is higher; query 2: item 3 ties with item 4
    assert ranks.tolist() == [3, 2, 2] == reference_ranks(query, gallery, positives)
    # the rank does not depend on where the positive sits among its equals
    shuffled = torch.tensor([4, 3, 2, 1, 0])
    inverse = torch.argsort(shuffled)
    moved = torch.stack([positives[:, 0], inverse[positives[:, 1]]], dim=1)
    assert retrieval_ranks(query, gallery[shuffled], moved).tolist() == [3, 2, 2]


def test_collapsed_embeddings_rank_last_not_first() -> None:
    # every item maps to the same embedding (a collapsed model): no query can be retrieved better than chance
    query, gallery = torch.ones(50, 4), torch.ones(50, 4)
    ranks = retrieval_ranks(query, gallery, torch.stack([torch.arange(50)] * 2, dim=1))
    assert ranks.tolist() == [50] * 50


def test_median_and_mean_rank() -> None:
    assert median_rank(torch.tensor([1, 2, 9])) == 2.0
    assert median_rank(torch.tensor([1, 2, 5, 9])) == 3.0  # floor((2 + 5) / 2), as OpenCLIP
    assert median_rank(torch.tensor([7, 4])) == 5.0
    # hand-built: the positives of the three queries are beaten by 0, 2 and 5 gallery items
    gallery = torch.eye(6)
    query = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0.5, 0.6, 0.9, 0, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    positives = torch.tensor([[0, 0], [1, 0], [2, 5]])
    metrics = retrieval_metrics(query, gallery, positives, chunk_size=2, prefix="q")
    assert retrieval_ranks(query, gallery, positives).tolist() == [1, 3, 6]
    assert metrics["q_R@1"] == pytest.approx(1 / 3)
    assert metrics["q_R@5"] == pytest.approx(2 / 3)
    assert metrics["q_R@10"] == 1.0
    assert metrics["q_median_rank"] == 3.0
    assert metrics["q_mean_rank"] == pytest.approx(10 / 3)


def test_bad_inputs_are_named() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="no correct gallery item"):
        retrieval_ranks(q, g, torch.tensor([[0, 1], [2, 2]]))
    with pytest.raises(ValueError, match=r"gallery rows outside 0\.\.4"):
        retrieval_ranks(q, g, torch.tensor([[0, 1], [1, 5], [2, 0]]))
    with pytest.raises(ValueError, match="same E"):
        retrieval_ranks(q, torch.randn(5, 3), torch.tensor([[0, 0], [1, 1], [2, 2]]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(torch.full((3, 4), math.nan), g, torch.tensor([[0, 0], [1, 1], [2, 2]]))


def test_large_retrieval_never_builds_the_full_matrix() -> None:
    """20k x 20k with chunk 1024: no tensor created during the call is more than a chunk of scores."""
    n, chunk = 20_000, 1024
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    texts = torch.nn.functional.normalize(items + 0.3 * torch.randn(n, 16, generator=g), dim=1)
    pairs = caption_pairs(torch.arange(n))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        ranks = retrieval_ranks(texts, items, pairs, chunk_size=chunk)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= 4 * chunk * n  # one float32 score chunk, far below the 1.6 GB full matrix
    assert ranks.float().mean() < n / 20  # still a real retrieval result (chance: n / 2)


def test_evaluate_model_merges_duplicate_items(tmp_path: Path) -> None:
    """Identical images and captions are one gallery item each, linked to every sample that holds them."""
    rows = [
        {"image": "a.png", "text": ["red square", "a square in red"]},
        {"image": "b.png", "text": "blue circle"},
        {"image": "a.png", "text": "red box"},  # the image of row 0 again
        {"image": "c.png", "text": "blue circle"},  # the caption of row 1 again
    ]
    path = write_jsonl(tmp_path, rows)
    texts = ["red square", "a square in red", "blue circle", "red box"]
    model = tiny_model(["image", "text"], texts)
    got = evaluate_model(model, str(path), "retrieval", batch_size=2)

    images = model.encode("image", [str(tmp_path / f) for f in ("a.png", "b.png", "c.png")])
    captions = model.encode("text", texts)
    pairs = torch.tensor([[0, 0], [0, 1], [1, 2], [0, 3], [2, 2]])  # (image a|b|c, caption)
    assert got == pytest.approx(bidirectional_retrieval(images, captions, pairs, ("image", "text")))
    assert (got["image_to_text_n_queries"], got["image_to_text_n_gallery"]) == (3, 4)


def test_evaluate_every_modality_pair_from_a_model_folder(emoji_root: Path, tmp_path: Path) -> None:
    from codebridge.data.emoji.suites import load_suite

    samples = load_suite("emoji-trimodal", "test", emoji_root)
    tiny_model(["image", "text", "audio"], all_texts(samples), emoji_root).save(tmp_path / "model")
    metrics = evaluate(tmp_path / "model", "emoji-trimodal:test", "retrieval", batch_size=32)
    directions = {key.rsplit("_R@1", 1)[0] for key in metrics if key.endswith("_R@1")}
    assert directions == {
        f"{a}_to_{b}" for a in ("image", "text", "audio") for b in ("image", "text", "audio") if a != b
    }
    n_images = len({s.media.get("image") for s in samples})
    assert metrics["audio_to_image_n_queries"] == len(samples) > n_images == metrics["audio_to_image_n_gallery"]
    assert all(0 <= metrics[f"{d}_R@1"] <= metrics[f"{d}_R@5"] <= metrics[f"{d}_R@10"] <= 1 for d in directions)
    assert all(1 <= metrics[f"{d}_median_rank"] <= metrics[f"{d}_n_gallery"] for d in directions)


def test_evaluate_errors_are_clear(tmp_path: Path) -> None:
    model = tiny_model(["image", "text"], ["red square"])
    with pytest.raises(TaskNotAvailable, match="the clip bridge has no codes"):
        evaluate_model(model, "never-read.jsonl", "codes")
    with pytest.raises(ConfigError, match="unknown eval task 'ranking'"):
        evaluate_model(model, "never-read.jsonl", "ranking")
    path = write_jsonl(tmp_path, [{"image": "a.png"}, {"image": "b.png"}])
    with pytest.raises(ConfigError, match=r"retrieval needs two modalities.*found image"):
        evaluate_model(model, str(path), "retrieval")
