"""FDT's sparsity path (temperature schedule to a final value, learnable grounding scale, overuse penalty) against
float64 references, and a tiny training run where it ends sparser than the dense default."""

from __future__ import annotations

import math

import pytest
import torch

from codebridge.config import BridgeConfig
from codebridge.models.bridges.fdt import FdtBridge, FdtConfig, fdt_temperature, overuse_penalty
from codebridge.models.features import Features

torch.set_num_threads(1)


@pytest.mark.parametrize("schedule", ["exponential", "cosine"])
def test_schedule_reaches_the_final_temperature(schedule):
    cfg = FdtConfig(
        temperature=1000.0, temperature_schedule=schedule, temperature_final=0.1, temperature_final_step=200
    )
    for step in (0, 1, 50, 100, 199, 200, 201, 10_000):
        p = min(step / 200, 1.0)
        if schedule == "exponential":
            want = 1000.0 * (0.1 / 1000.0) ** p  # geometric interpolation
        else:
            want = 0.1 * (1000.0 / 0.1) ** ((1 + math.cos(math.pi * p)) / 2)
        assert fdt_temperature(cfg, step) == pytest.approx(want, rel=1e-12), step
    assert fdt_temperature(cfg, 100) == pytest.approx(10.0, rel=1e-12)  # the midpoint in log T
    decay = FdtConfig(temperature=1000.0, temperature_decay=0.3, temperature_every=10, temperature_final=0.1)
    assert fdt_temperature(decay, 25) == pytest.approx(1000 * 0.3**2)  # the authors' schedule is unchanged


def test_overuse_penalty_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(3 * torch.randn(6, 5, dtype=torch.float64, generator=g), -1).requires_grad_(True)
    target = 0.2
    got = overuse_penalty(w, target)
    want = sum(max(sum(w[b, c] for b in range(6)) / 6 - target, 0.0) for c in range(5))
    assert torch.allclose(got, want, atol=1e-12) and got > 0
    (grad,) = torch.autograd.grad(got, w)
    means = w.detach().mean(0)
    for c in range(5):  # 1/B for every row of an overused token, 0 otherwise
        assert torch.allclose(grad[:, c], torch.full((6,), float(means[c] > target) / 6, dtype=torch.float64))


def features(concepts: torch.Tensor, protos: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, Features]:
    out = {}
    for m, proto in protos.items():
        tokens = proto[concepts].unsqueeze(1) + 0.3 * torch.randn(len(concepts), 4, proto.shape[1], generator=g)
        out[m] = Features(tokens, torch.ones(len(concepts), 4, dtype=torch.bool), tokens.mean(1))
    return out


def train_active_tokens(**fdt) -> tuple[float, float]:
    """(Mean active tokens per sample, tokens used by some sample) after 60 steps of the bridge alone on 8 toy
    concepts (fixed seeds)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    protos = {"image": torch.randn(8, 12, generator=g), "text": torch.randn(8, 10, generator=g)}
    cfg = FdtConfig(num_tokens=64, dim=16, **fdt)
    bridge = FdtBridge(BridgeConfig(name="fdt", sections={"fdt": cfg}), {"image": 12, "text": 10}).train()
    opt = torch.optim.Adam(bridge.parameters(), lr=1e-2)
    for step in range(60):
        total, _ = bridge.loss(bridge(features(torch.randint(8, (32,), generator=g), protos, g), step), step)
        opt.zero_grad()
        total.backward()
        opt.step()
    bridge.usage()
    bridge(features(torch.arange(8).repeat(4), protos, g), 60)
    usage = bridge.usage()
    active = (usage["fdt/image/active"] + usage["fdt/text/active"]) / 2
    return active, usage["fdt/image/used"] * 64


def test_sparsity_path_ends_sparser_than_the_dense_default():
    dense, _ = train_active_tokens()  # T = 1000 throughout: the measured failure (almost every token active)
    sparse, used = train_active_tokens(
        temperature_schedule="exponential",
        temperature_final=0.05,
        temperature_final_step=50,
        learnable_scale=True,
        overuse_weight=1.0,
        overuse_target=0.25,
    )
    assert dense > 48
    assert sparse < 8 and sparse < dense / 4
    assert used >= 6  # not one token for everything: the 8 concepts keep (nearly) their own tokens


def test_max_active_caps_the_support_and_still_learns():
    capped, used = train_active_tokens(max_active=4)  # T = 1000 as the dense default, support capped at 4
    assert capped <= 4
    assert used >= 6


def test_max_active_needs_sparsemax():
    assert FdtConfig(max_active=8).check() == []
    assert FdtConfig(max_active=8, activation="softmax").check()


def test_learnable_scale_equals_a_lower_temperature_and_is_trained():
    g = torch.Generator().manual_seed(0)
    feats = {
        m: Features(torch.randn(3, 4, w, generator=g), torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, w))
        for m, w in {"image": 6, "text": 5}.items()
    }
    torch.manual_seed(0)
    scaled = FdtBridge(
        BridgeConfig(
            name="fdt", sections={"fdt": FdtConfig(num_tokens=16, dim=8, temperature=4.0, learnable_scale=True)}
        ),
        {"image": 6, "text": 5},
    )
    torch.manual_seed(0)
    plain = FdtBridge(
        BridgeConfig(name="fdt", sections={"fdt": FdtConfig(num_tokens=16, dim=8, temperature=2.0)}),
        {"image": 6, "text": 5},
    )
    with torch.no_grad():
        scaled.log_grounding_scale.fill_(math.log(2.0))
    a, b = scaled(feats, 0), plain(feats, 0)
    for m in feats:
        assert torch.allclose(a[m].extras["weights"], b[m].extras["weights"], atol=1e-6)
    total, logs = scaled.loss(a, 0)
    total.backward()
    assert scaled.log_grounding_scale.grad is not None and logs["fdt/grounding_scale"] == pytest.approx(2.0)
    assert "log_grounding_scale" in scaled.no_weight_decay()
