"""Zero-shot classification: hand-built embeddings with known answers, the prompt ensemble, class names, the task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codebridge.config import ConfigError
from codebridge.data.sample import Sample
from codebridge.eval.run import evaluate_model
from codebridge.eval.zeroshot import (
    build_classifier,
    classifier_weights,
    names_from_meta,
    prompts,
    zeroshot_metrics,
)
from test_retrieval import tiny_model, write_jsonl


def test_prompts_fill_every_template_for_every_class() -> None:
    assert prompts(["cat", "dog face"], ["{}", "an emoji of {}"]) == [
        "cat",
        "an emoji of cat",
        "dog face",
        "an emoji of dog face",
    ]
    with pytest.raises(ConfigError, match=r"eval\.zeroshot_templates\[1\]: 'a picture' has no"):
        prompts(["cat"], ["{}", "a picture"])
    with pytest.raises(ConfigError, match="is empty"):
        prompts(["cat"], [])


def test_classifier_averages_normalised_prompts_then_renormalises() -> None:
    # class 0: prompts along x (length 1) and y (length 10): normalising first gives equal weight -> diagonal
    # class 1: a single prompt of length 3 along z
    prompt_embeddings = torch.tensor([[[1.0, 0, 0], [0, 10.0, 0]], [[0, 0, 3.0], [0, 0, 3.0]]])
    weights = classifier_weights(prompt_embeddings)
    half = 2**-0.5
    assert torch.allclose(weights, torch.tensor([[half, half, 0], [0, 0, 1.0]]))


def test_accuracy_on_hand_built_embeddings() -> None:
    # 4 classes along the axes, label values 7, 3, 9, 4 (not contiguous, not sorted)
    classifier = torch.eye(4)
    classes = [7, 3, 9, 4]
    embeddings = torch.tensor(
        [
            [1.0, 0.1, 0.0, 0.0],  # class 7: right
            [0.2, 0.9, 0.0, 0.0],  # class 3: right
            [0.0, 0.0, 0.3, 0.8],  # class 9: wrong (4 wins), 9 is second
            [0.9, 0.8, 0.7, 0.1],  # class 4: wrong, 4 ranks last of four
            [5.0, 5.0, 5.0, 5.0],  # no label: left out
        ]
    )
    labels = torch.tensor([7, 3, 9, 4, -1])
    metrics = zeroshot_metrics(embeddings, labels, classifier, classes, "group", chunk_size=3)
    assert metrics == {"zeroshot_group_top1": 0.5, "zeroshot_group_top5": 1.0, "zeroshot_group_n_classes": 4}
    # with more classes than 5, top-5 can miss: add 3 distractor classes that beat the class-4 sample
    distractors = F.normalize(torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(3, 1), dim=1)
    more = torch.cat([classifier, distractors])
    metrics = zeroshot_metrics(embeddings, labels, more, [*classes, 0, 1, 2], "group")
    assert metrics["zeroshot_group_top1"] == 0.5
    assert metrics["zeroshot_group_top5"] == 0.75  # class 4 is now 7th of 7 for its sample


def test_unnamed_or_missing_classes_are_errors() -> None:
    with pytest.raises(ValueError, match=r"classes \[5\] have no name"):
        zeroshot_metrics(torch.eye(2), torch.tensor([0, 5]), torch.eye(2), [0, 1], "group")
    with pytest.raises(ValueError, match="no sample has the label 'group'"):
        zeroshot_metrics(torch.eye(2), torch.tensor([-1, -1]), torch.eye(2), [0, 1], "group")


def sample(i: int, labels: dict[str, int], names: dict[str, str] | None) -> Sample:
    meta = {} if names is None else {"label_names": names}
    return Sample(key=str(i), source=f"data.jsonl:{i + 1}", labels=labels, meta=meta, media={"text": ["x"]})


def test_class_names_from_meta() -> None:
    samples = [
        sample(0, {"group": 2}, {"group": "animals"}),
        sample(1, {"group": 0}, {"group": "food"}),
        sample(2, {}, None),  # unlabelled: needs no name
        sample(3, {"group": 2}, {"group": "animals"}),
    ]
    assert names_from_meta(samples, "group") == {2: "animals", 0: "food"}
    with pytest.raises(ConfigError, match=r"data\.jsonl:2: zero-shot needs a class name for label 'group'"):
        names_from_meta([samples[0], sample(1, {"group": 0}, None)], "group")
    with pytest.raises(ConfigError, match=r"data\.jsonl:2: group class 2 is named 'pets' here but 'animals'"):
        names_from_meta([samples[0], sample(1, {"group": 2}, {"group": "pets"})], "group")


def test_build_classifier_is_the_prompt_ensemble_of_the_model() -> None:
    templates = ["{}", "a picture of {}"]
    names = ["red square", "blue circle", "green star"]
    model = tiny_model(["image", "text"], prompts(names, templates))
    weights = build_classifier(model, names, templates, batch_size=4)
    for name, row in zip(names, weights, strict=True):
        single = F.normalize(model.encode("text", [t.replace("{}", name) for t in templates]), dim=1)
        assert torch.allclose(row, F.normalize(single.mean(0), dim=0), atol=1e-6)


def test_zeroshot_task_on_user_data(tmp_path: Path) -> None:
    rows = [
        {"image": f"{i}.png", "text": "x", "labels": {"shape": i % 3}, "meta": {"label_names": {"shape": s}}}
        for i, s in enumerate(["square", "circle", "star"] * 3)
    ]
    path = write_jsonl(tmp_path, rows)
    model = tiny_model(["image", "text"], ["square", "circle", "star", "an emoji of"])
    metrics = evaluate_model(model, str(path), "zeroshot", label="shape")
    assert set(metrics) == {
        "zeroshot_top1",
        "zeroshot_top5",
        "zeroshot_shape_top1",
        "zeroshot_shape_top5",
        "zeroshot_shape_n_classes",
    }
    assert metrics["zeroshot_shape_n_classes"] == 3
    assert metrics["zeroshot_shape_top5"] == 1.0  # three classes: always within the top five
    assert metrics["zeroshot_top1"] == metrics["zeroshot_shape_top1"] in {i / 9 for i in range(10)}
    with pytest.raises(ConfigError, match="no sample has the label group or subgroup; labels present: shape"):
        evaluate_model(model, str(path), "zeroshot")


def test_zeroshot_task_on_a_builtin_suite(emoji_root: Path) -> None:
    from codebridge.data.emoji.suites import class_names

    groups, subgroups = class_names("group", emoji_root), class_names("subgroup", emoji_root)
    model = tiny_model(["image", "text"], [*groups, *subgroups, "an emoji of"], emoji_root)
    metrics = evaluate_model(model, "emoji-style:test", "zeroshot", batch_size=64)
    assert metrics["zeroshot_group_n_classes"] == len(groups)
    assert metrics["zeroshot_subgroup_n_classes"] == len(subgroups)
    assert (metrics["zeroshot_top1"], metrics["zeroshot_top5"]) == (
        metrics["zeroshot_group_top1"],
        metrics["zeroshot_group_top5"],
    )
    for label in ("group", "subgroup"):
        assert 0 <= metrics[f"zeroshot_{label}_top1"] <= metrics[f"zeroshot_{label}_top5"] <= 1
