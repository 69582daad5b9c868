import math

import pytest
import torch

from codebridge.config import BridgeConfig
from codebridge.models.bridges.base import BRIDGES
from codebridge.models.bridges.clip import ClipBridge
from codebridge.models.features import Features

WIDTHS = {"image": 6, "text": 5, "audio": 7}


def features(modalities: list[str], batch: int = 4, seed: int = 0) -> dict[str, Features]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modalities:
        summary = torch.randn(batch, WIDTHS[m], generator=g, dtype=torch.float64)
        out[m] = Features(tokens=summary[:, None], mask=torch.ones(batch, 1, dtype=torch.bool), summary=summary)
    return out


def bridge(modalities: list[str], **cfg) -> ClipBridge:
    torch.manual_seed(0)
    return ClipBridge(BridgeConfig(embed_dim=3, **cfg), {m: WIDTHS[m] for m in modalities}).double()


def reference_loss(model: ClipBridge, feats: dict[str, Features], scale: float, margin: float) -> dict[str, float]:
    """Written from the formula: project, normalise, symmetric cross-entropy per pair, loops over rows, float64."""
    emb = {}
    for m, f in feats.items():
        z = f.summary @ model.proj[m].weight.detach().T
        emb[m] = z / z.norm(dim=1, keepdim=True)
    parts = {}
    names = sorted(emb)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            n = emb[a].shape[0]
            total = 0.0
            for r in range(n):
                for x, y in ((emb[a], emb[b]), (emb[b], emb[a])):
                    logits = [scale * (float(x[r] @ y[c]) - (margin if c == r else 0.0)) for c in range(n)]
                    total -= logits[r] - math.log(sum(math.exp(v) for v in logits))
            parts[f"loss/contrastive/{a}-{b}"] = total / (2 * n)
    return parts


def test_registered_as_clip():
    assert BRIDGES.get("clip") is ClipBridge


def test_embeddings_are_normalised_projections():
    model = bridge(["image", "text"])
    out = model(features(["image", "text"]))
    assert set(out) == {"image", "text"}
    for o in out.values():
        assert o.embedding.shape == (4, 3) and o.extras == {}
        assert torch.allclose(o.embedding.norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert model.proj["image"].bias is None


@pytest.mark.parametrize("modalities", [["image", "text"], ["image", "text", "audio"]])
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_loss_matches_float64_reference(modalities, margin):
    model = bridge(modalities, margin=margin)
    feats = features(modalities)
    loss, logs = model.loss(model(feats))
    scale = model.logit_scale.log_scale.item()  # ln(1/0.07) as stored (a float32 initial value)
    expected = reference_loss(model, feats, math.exp(scale), margin)
    assert set(logs) == {*expected, "logit_scale"}
    assert len(expected) == math.comb(len(modalities), 2)
    for name, value in expected.items():
        assert math.isclose(logs[name], value, rel_tol=1e-9)
    assert math.isclose(loss.item(), sum(expected.values()), rel_tol=1e-9)
    assert math.isclose(logs["logit_scale"], 1 / 0.07, rel_tol=1e-6)


def test_logit_scale_is_clamped_in_the_loss():
    model = bridge(["image", "text"], max_logit_scale=50.0)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(8.0)  # e^8 ~ 2981, above the clamp
    feats = features(["image", "text"])
    loss, logs = model.loss(model(feats))
    assert logs["logit_scale"] == 50.0
    assert math.isclose(loss.item(), sum(reference_loss(model, feats, 50.0, 0.0).values()), rel_tol=1e-9)


def test_param_clamp_after_step():
    model = bridge(["image", "text"], logit_scale_clamp="param")
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(9.0)
    model.post_step()
    assert model.logit_scale.log_scale.item() == 6.0


def test_gradients_reach_projections_and_scale():
    model = bridge(["image", "text", "audio"])
    loss, _ = model.loss(model(features(["image", "text", "audio"])))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_one_modality_cannot_make_a_loss():
    model = bridge(["image", "text"])
    with pytest.raises(ValueError, match="two modalities"):
        model.loss(model(features(["image"])))
