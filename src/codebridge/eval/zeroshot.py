"""Zero-shot classification, OpenCLIP style: each class is the re-normalised mean of its prompts' text embeddings.

Class names come from the data: the source names them when it can (``Source.class_names``: the built-in suites
do); otherwise (JSONL, WebDataset) each labelled sample names its class in ``meta["label_names"]``, e.g.
``{"labels": {"group": 3}, "meta": {"label_names": {"group": "animals"}}}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from codebridge.config import ConfigError
from codebridge.data.sample import Sample

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel

KS = (1, 5)
LABEL_NAMES = "label_names"  # the meta key of user data naming each sample's classes


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template for every class, class-major; "{}" in a template is replaced by the class name."""
    for i, template in enumerate(templates):
        if "{}" not in template:
            raise ConfigError(f"eval.zeroshot_templates[{i}]: {template!r} has no '{{}}' where the class name goes")
    if not templates:
        raise ConfigError("eval.zeroshot_templates is empty; give at least one template such as '{}'")
    return [template.replace("{}", name) for name in class_names for template in templates]


def classifier_weights(prompt_embeddings: Tensor) -> Tensor:
    """``[C, T, E]`` prompt embeddings -> ``[C, E]``: normalise each, average per class, normalise again."""
    return F.normalize(F.normalize(prompt_embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def build_classifier(
    model: CodeBridgeModel, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> Tensor:
    """``[C, E]`` zero-shot weights from the model's text embeddings of every (class, template) prompt."""
    embeddings = model.encode("text", prompts(class_names, templates), batch_size)
    return classifier_weights(embeddings.view(len(class_names), len(templates), -1))


def topk_correct(scores: Tensor, targets: Tensor, ks: Sequence[int] = KS) -> dict[int, int]:
    """How many rows have their target among the k highest scores; k is capped at the number of classes."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [N, k]
    hit = top == targets[:, None]
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


def zeroshot_metrics(
    embeddings: Tensor,
    labels: Tensor,
    classifier: Tensor,
    classes: Sequence[int],
    label: str,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """``zeroshot_{label}_top1/top5`` of ``embeddings`` ``[N, E]`` against ``classifier`` rows.

    ``classes[r]`` is the label value of classifier row ``r``; samples labelled -1 (no such label) are left out,
    a label value without a classifier row is an error (its class has no name).
    """
    row_of = {value: row for row, value in enumerate(classes)}
    keep = (labels >= 0).nonzero().flatten().tolist()
    unnamed = sorted({int(labels[i]) for i in keep} - set(row_of))
    if unnamed:
        raise ValueError(f"{label}: classes {unnamed[:10]} have no name, so they cannot be scored zero-shot")
    if not keep:
        raise ValueError(f"no sample has the label {label!r}")
    targets = torch.tensor([row_of[int(labels[i])] for i in keep], device=embeddings.device)
    kept = embeddings[torch.tensor(keep, device=embeddings.device)].float()
    classifier = classifier.to(kept.device)
    correct = dict.fromkeys(KS, 0)
    for start in range(0, len(kept), chunk_size):
        chunk = topk_correct(kept[start : start + chunk_size] @ classifier.T, targets[start : start + chunk_size])
        correct = {k: correct[k] + chunk[k] for k in KS}
    metrics: dict[str, float] = {f"zeroshot_{label}_top{k}": correct[k] / len(keep) for k in KS}
    metrics[f"zeroshot_{label}_n_classes"] = len(classes)
    return metrics


def names_from_meta(samples: Sequence[Sample], label: str) -> dict[int, str]:
    """``{label value: class name}`` from each labelled sample's ``meta["label_names"][label]``."""
    names: dict[int, str] = {}
    for sample in samples:
        value = sample.labels.get(label, -1)
        if value < 0:
            continue
        table = sample.meta.get(LABEL_NAMES)
        name = table.get(label) if isinstance(table, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"{sample.source}: zero-shot needs a class name for label {label!r}; "
                f'add meta {{"{LABEL_NAMES}": {{"{label}": "<name of class {value}>"}}}} (JSONL/WebDataset)'
            )
        if names.setdefault(value, name) != name:
            raise ConfigError(
                f"{sample.source}: {label} class {value} is named {name!r} here but {names[value]!r} elsewhere"
            )
    return names
