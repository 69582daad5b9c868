"""The bridge interface must not move a number: localization maps, code scores, codes analysis, pointing game and
report usage are compared with copies of the formulas eval and the report used before bridges answered for
themselves (the ``old_*`` functions below reach into bridge internals on purpose: they are the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from codebridge.config import DataConfig
from codebridge.data.dataset import SampleDataset, collate
from codebridge.data.emoji.suites import load_suite
from codebridge.data.sources import source_for
from codebridge.eval import codes as codes_module
from codebridge.eval import localization, pointing
from codebridge.eval.codes import evaluate_codes
from codebridge.eval.localization import code_affinity, encode_features, position_similarity
from codebridge.eval.pointing import evaluate_localization
from codebridge.models.bridges.fdt_grounding import token_scores
from codebridge.models.bridges.sparsemax import sparsemax
from codebridge.models.bridges.vector_quantizer import SQRT_FLOOR, squared_distances
from codebridge.models.features import Features
from codebridge.report.usage import model_code_usage
from test_localization import CAPTIONS, random_image, tiny_model

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ the old formulas
def old_code_affinity(model, modality: str, features: Features) -> torch.Tensor:
    bridge, name = model.bridge, model.cfg.model.bridge.name
    if name == "codebook":
        h = bridge.token_proj[modality](features.tokens)
        embed = bridge.codebook.embed
        d2 = squared_distances(h.flatten(0, 1).to(embed.dtype), embed).clamp_min(SQRT_FLOOR)
        affinity = -d2.sqrt().view(*h.shape[:2], -1)
    else:
        q = bridge.query[modality](features.tokens)
        affinity = token_scores(q, bridge.tokens, features.mask, bridge.temperature(), "neg_inf")
    return affinity.masked_fill(~features.mask.unsqueeze(-1), 0.0)


def old_fdt_weights(model, scores: torch.Tensor) -> torch.Tensor:
    activation = model.cfg.model.bridge.fdt.activation
    if activation == "sparsemax":
        return sparsemax(scores)
    return torch.softmax(scores, -1) if activation == "softmax" else torch.sigmoid(scores)


def old_position_similarity(model, query: str, q: Features, target: str, t: Features) -> torch.Tensor:
    name = model.cfg.model.bridge.name
    if name == "codebook":
        pq = torch.softmax(old_code_affinity(model, query, q), -1)
        pt = torch.softmax(old_code_affinity(model, target, t), -1) * t.mask.unsqueeze(-1)
        sim = pq @ (pt / pt.sum(1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)
    elif name == "fdt":
        wq = old_fdt_weights(model, old_code_affinity(model, query, q))
        sim = wq @ old_code_affinity(model, target, t).transpose(1, 2)
    else:
        proj = model.bridge.proj
        eq, et = F.normalize(proj[query](q.tokens), dim=-1), F.normalize(proj[target](t.tokens), dim=-1)
        sim = eq @ et.transpose(1, 2)
    return sim.masked_fill(~t.mask.unsqueeze(1), float("-inf"))


@torch.no_grad()
def old_usage_counts(model, samples, batch_size: int) -> tuple[str, dict[str, np.ndarray]]:
    bridge = model.cfg.model.bridge
    key, size = ("codes", bridge.codebook.size) if bridge.name == "codebook" else ("weights", bridge.fdt.num_tokens)
    counts = {}
    for modality in [m for m in model.modalities if all(s.has(m) for s in samples)]:
        dataset = SampleDataset(samples, [modality], model.preprocessors, train=False)
        total = np.zeros(size)
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            output = model.bridge({modality: model.features(modality, batch[modality])})[modality]
            if key == "codes":
                codes = output.extras["codes"]
                total += torch.bincount(codes[codes >= 0].flatten().cpu(), minlength=size).double().numpy()
            else:
                total += output.extras["weights"].double().sum(0).cpu().numpy()
        counts[modality] = total
    return {"codes": "token positions", "weights": "token weight mass"}[key], counts


def _pair(model):
    images = [random_image(seed=i) for i in range(len(CAPTIONS))]
    return encode_features(model, "text", CAPTIONS), encode_features(model, "image", images)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("bridge", ["clip", "codebook", "fdt"])
@torch.no_grad()
def test_position_similarity_equals_the_old_formulas(bridge: str) -> None:
    model = tiny_model(bridge, CAPTIONS)
    text, image = _pair(model)
    for args in (("text", text, "image", image), ("image", image, "text", text)):
        # FDT: the old copy used the sort-based sparsemax, the bridge uses its exact top-k variant
        torch.testing.assert_close(position_similarity(model, *args), old_position_similarity(model, *args))


@pytest.mark.parametrize("activation", ["sparsemax", "softmax", "sigmoid"])
@pytest.mark.parametrize("topk", [True, False])
@torch.no_grad()
def test_fdt_maps_follow_the_configured_activation(activation: str, topk: bool) -> None:
    model = tiny_model("fdt", CAPTIONS)
    model.bridge.fdt.activation, model.bridge.fdt.topk_sparsemax = activation, topk
    model.bridge._activation = model.bridge._make_activation()
    text, image = _pair(model)
    torch.testing.assert_close(
        position_similarity(model, "text", text, "image", image),
        old_position_similarity(model, "text", text, "image", image),
    )


@pytest.mark.parametrize("bridge", ["codebook", "fdt"])
@torch.no_grad()
def test_code_scores_equal_the_old_formulas(bridge: str) -> None:
    model = tiny_model(bridge, CAPTIONS)
    for modality, features in zip(("text", "image"), _pair(model), strict=True):
        assert torch.equal(code_affinity(model, modality, features), old_code_affinity(model, modality, features))


@pytest.mark.parametrize("bridge", ["clip", "codebook", "fdt"])
def test_pointing_game_numbers_are_unchanged(emoji_root: Path, bridge: str, monkeypatch) -> None:
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:6]
    model = tiny_model(bridge, [s.media.get("text", [])[0] for s in scenes])
    metrics = evaluate_localization(model, scenes, batch_size=4)
    monkeypatch.setattr(localization, "position_similarity", old_position_similarity)
    monkeypatch.setattr(pointing, "position_similarity", old_position_similarity)
    assert metrics == pytest.approx(evaluate_localization(model, scenes, batch_size=4), rel=1e-6)


@pytest.mark.parametrize("bridge", ["codebook", "fdt"])
def test_codes_analysis_is_unchanged(emoji_root: Path, tmp_path: Path, bridge: str, monkeypatch) -> None:
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:6]
    model = tiny_model(bridge, [s.media.get("text", [])[0] for s in scenes])
    groups = source_for("emoji-scenes:test", DataConfig(root=str(emoji_root))).concept_groups()
    metrics = evaluate_codes(model, scenes, tmp_path / "new", groups=groups, batch_size=4, top=3)
    monkeypatch.setattr(codes_module, "code_affinity", old_code_affinity)
    reference = evaluate_codes(model, scenes, tmp_path / "old", groups=groups, batch_size=4, top=3)
    assert metrics == reference
    for folder in ("new", "old"):
        assert (tmp_path / folder / "codes.json").is_file()
    new, old = (json.loads((tmp_path / f / "codes.json").read_text()) for f in ("new", "old"))
    assert new == old


@pytest.mark.parametrize("bridge", ["codebook", "fdt"])
def test_report_usage_counts_are_unchanged(emoji_root: Path, bridge: str) -> None:
    scenes = load_suite("emoji-scenes", "train", root=emoji_root)[:7]
    model = tiny_model(bridge, [s.media.get("text", [])[0] for s in scenes])
    usage = model_code_usage(model, scenes, batch_size=3)
    unit, counts = old_usage_counts(model, scenes, batch_size=3)
    assert usage.unit == unit and usage.size == 16 and set(usage.counts) == set(counts)
    for modality, values in counts.items():
        np.testing.assert_allclose(usage.counts[modality], values, rtol=1e-12)
