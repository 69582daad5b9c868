import math

import torch
import torch.nn.functional as F

from codebridge.config import BridgeConfig
from codebridge.models.bridges.base import LogitScale, contrastive_loss, pairwise_contrastive


def reference_infonce(a, b, scale, margin=0.0):
    """Straight from the formula, float64, loops over rows."""
    sim = a @ b.T
    n = sim.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * (sim[i, j] - (margin if j == i else 0.0)) for j in range(n)]
        col = [scale * (sim[j, i] - (margin if j == i else 0.0)) for j in range(n)]
        total += -(row[i] - torch.logsumexp(torch.stack(row), 0))
        total += -(col[i] - torch.logsumexp(torch.stack(col), 0))
    return total / (2 * n)


def test_contrastive_matches_reference():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    for margin in (0.0, 0.2):
        got = contrastive_loss(a, b, torch.tensor(7.0, dtype=torch.float64), margin)
        assert torch.allclose(got, reference_infonce(a, b, 7.0, margin), atol=1e-12)


def test_pairwise_sums_all_pairs():
    g = torch.Generator().manual_seed(1)
    embs = {m: F.normalize(torch.randn(4, 3, generator=g), dim=-1) for m in ("text", "image", "audio")}
    total, parts = pairwise_contrastive(embs, torch.tensor(5.0))
    assert sorted(parts) == ["contrastive/audio-image", "contrastive/audio-text", "contrastive/image-text"]
    assert torch.allclose(total, sum(parts.values()))


def test_logit_scale_clamps():
    s = LogitScale(BridgeConfig(init_logit_scale=1 / 0.07))
    assert math.isclose(s().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        s.log_scale.fill_(10.0)
    assert s().item() == 100.0
    p = LogitScale(BridgeConfig(logit_scale_clamp="param"))
    assert math.isclose(p.log_scale.item(), 3.0)  # ln(1/0.07) = 2.66 is raised to the lower bound 3
    with torch.no_grad():
        p.log_scale.fill_(7.0)
    p.post_step()
    assert p.log_scale.item() == 6.0
