"""Linear probe: separable features are learnt, random labels stay at chance, and the task end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codebridge.config import ConfigError
from codebridge.eval.linear_probe import linear_probe
from codebridge.eval.run import evaluate_model
from test_retrieval import tiny_model, write_jsonl

N_CLASSES = 4


def clusters(n: int, seed: int, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around 4 fixed, well-separated centres in 16 dimensions, with their class."""
    centres = 5 * torch.randn(N_CLASSES, 16, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_CLASSES, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, 16, generator=g), labels


def test_separable_features_are_classified() -> None:
    train_x, train_y = clusters(200, seed=1)
    test_x, test_y = clusters(200, seed=2)
    assert linear_probe(train_x, train_y, test_x, test_y) == 1.0


def test_random_labels_stay_at_chance() -> None:
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    train_y, test_y = torch.randint(N_CLASSES, (400,), generator=g), torch.randint(N_CLASSES, (400,), generator=g)
    assert 0.15 < linear_probe(train_x, train_y, test_x, test_y) < 0.35  # chance: 0.25, std ~0.02


def test_unlabelled_rows_are_left_out_and_unseen_classes_count_wrong() -> None:
    train_x, train_y = clusters(200, seed=1)
    test_x, test_y = clusters(200, seed=2)
    junk = torch.randn(50, 16) * 100
    train_x, train_y = torch.cat([train_x, junk]), torch.cat([train_y, torch.full((50,), -1)])
    unseen = torch.full((50,), 9)  # a class the probe never saw: always wrong
    test_x = torch.cat([test_x, junk[:50], junk[:50]])
    test_y = torch.cat([test_y, torch.full((50,), -1), unseen])
    assert linear_probe(train_x, train_y, test_x, test_y) == 200 / 250


def test_a_single_training_class_is_an_error() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="single 'group' class"):
        linear_probe(x, torch.zeros(10, dtype=torch.long), x, torch.zeros(10, dtype=torch.long), label="group")
    with pytest.raises(ValueError, match="no test sample has the label 'group'"):
        linear_probe(x, torch.arange(10) % 2, x, torch.full((10,), -1), label="group")


def test_linear_probe_task_on_a_builtin_suite(emoji_root: Path) -> None:
    model = tiny_model(["image", "text"], ["grinning face"], emoji_root)
    metrics = evaluate_model(model, "emoji-style:test", "linear-probe", batch_size=64)  # fits on emoji-style:train
    assert set(metrics) == {"linear_probe_group_top1", "linear_probe_subgroup_top1"}
    assert all(0 <= value <= 1 for value in metrics.values())


def test_linear_probe_task_on_user_data(tmp_path: Path) -> None:
    rows = [{"image": f"{i % 4}.png", "text": "x", "labels": {"shape": i % 4}} for i in range(12)]
    path = str(write_jsonl(tmp_path, rows))
    model = tiny_model(["image", "text"], ["x"])
    with pytest.raises(ConfigError, match="--train-data"):
        evaluate_model(model, path, "linear-probe", label="shape")
    # the same four images in train and test: frozen features of identical inputs are separable
    metrics = evaluate_model(model, path, "linear-probe", train_spec=path, label="shape")
    assert metrics == {"linear_probe_shape_top1": 1.0}
