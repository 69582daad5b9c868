"""Frozen embeddings of a dataset, with the model's own eval preprocessing.

Retrieval embeds each distinct item once: identical captions, or media with the same path or bytes, are one
gallery item, and every sample links its items (an image to each of its captions). That is the COCO convention,
and it keeps duplicated images or captions (two voices reading one label, one caption for two art styles) from
counting as wrong answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from codebridge.data.dataset import SampleDataset, build_loader
from codebridge.data.sample import Sample

if TYPE_CHECKING:
    from codebridge.models.model import CodeBridgeModel


def embed_dataset(
    model: CodeBridgeModel, samples: list[Sample], modality: str, batch_size: int = 256, num_workers: int = 0
) -> Tensor:
    """``[N, E]``: one embedding per sample (text: its first caption), on the model's device.

    A sample that lacks the modality or fails to decode stops with a ``BadSampleError`` naming its source (raised
    in this process, whichever worker met it): skipping it would misalign the rows with the other modalities and
    the labels; ``evaluate_model`` leaves bad samples out before embedding when ``data.skip_bad`` is set.
    """
    return torch.cat(
        [
            model.encode(modality, entry, batch_size)
            for entry in _entries(samples, modality, model, batch_size, num_workers)
        ]
    )


def _entries(
    samples: list[Sample], modality: str, model: CodeBridgeModel, batch_size: int, num_workers: int
) -> Iterator[dict[str, Tensor]]:
    """The collated ``modality`` entries of ``samples``, batch by batch, with the model's eval preprocessing."""
    if not samples:
        raise ValueError(f"no samples to embed for {modality}")
    dataset = SampleDataset(samples, [modality], model.preprocessors, train=False)
    loader = build_loader(
        dataset,
        batch_size,
        shuffle=False,
        seed=0,
        num_workers=num_workers,
        drop_last=False,
        pin_memory=model.device.type == "cuda",
    )
    return (batch[modality] for batch in loader)


@dataclass
class Items:
    """Distinct items of one modality: ``embeddings[r]`` is item r; ``rows[i]`` lists the items of sample i."""

    embeddings: Tensor
    rows: list[list[int]]


def _keys(sample: Sample, modality: str) -> list[Hashable]:
    """What makes an item distinct: each entry of a list (the captions), or the media path or bytes."""
    value = sample.media[modality]
    return list(value) if isinstance(value, list) else [value]


@dataclass
class PartItems:
    """Distinct items of one modality with the bridge's two retrieval parts (``Bridge.retrieval_parts``):
    ``continuous[r]`` and ``discrete[r]`` belong to item r; ``rows[i]`` lists the items of sample i."""

    continuous: Tensor
    discrete: Tensor
    rows: list[list[int]]


def distinct_items(samples: list[Sample], modality: str) -> tuple[list[Sample], list[list[int]]]:
    """(one sample per distinct item, holding only that item; the items of every sample)."""
    index: dict[Hashable, int] = {}
    firsts: list[Sample] = []  # the first sample holding each item, with that item as its only entry (caption)
    rows = []
    for sample in samples:
        own = []
        for key in _keys(sample, modality):
            if key not in index:
                index[key] = len(index)
                listed = isinstance(sample.media[modality], list)
                firsts.append(
                    dataclasses.replace(sample, media={**sample.media, modality: [key]}) if listed else sample
                )
            own.append(index[key])
        rows.append(sorted(set(own)))
    return firsts, rows


def embed_items(
    model: CodeBridgeModel, samples: list[Sample], modality: str, batch_size: int = 256, num_workers: int = 0
) -> Items:
    """Embeddings of the distinct items (for text: every distinct caption of every sample) and who owns them."""
    firsts, rows = distinct_items(samples, modality)
    return Items(embed_dataset(model, firsts, modality, batch_size, num_workers), rows)


def embed_item_parts(
    model: CodeBridgeModel, samples: list[Sample], modality: str, batch_size: int = 256, num_workers: int = 0
) -> PartItems:
    """``embed_items`` with the continuous and discrete parts of each item instead of its embedding."""
    firsts, rows = distinct_items(samples, modality)
    parts = [
        model.encode_parts(modality, entry, batch_size)
        for entry in _entries(firsts, modality, model, batch_size, num_workers)
    ]
    return PartItems(torch.cat([c for c, _ in parts]), torch.cat([d for _, d in parts]), rows)


def matching_pairs(a: Items, b: Items) -> Tensor:
    """``[P, 2]`` distinct (item of a, item of b) pairs that share a sample: the correct answers of retrieval."""
    pairs = {(i, j) for rows_a, rows_b in zip(a.rows, b.rows, strict=True) for i in rows_a for j in rows_b}
    return torch.tensor(sorted(pairs), dtype=torch.long).view(-1, 2)
