"""AdamW parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from codebridge.config import Config, TrainConfig
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.models.model import CodeBridgeModel
from codebridge.train.optim import WarmupCosine, build_optimizer, lr_at, no_decay_names


def tiny_model(bridge: str = "clip") -> CodeBridgeModel:
    cfg = Config()
    cfg.prep.text.vocab_size = 300
    cfg.model.image.width = cfg.model.text.width = 32
    cfg.model.image.depth = cfg.model.text.depth = 1
    cfg.model.bridge.name = bridge
    cfg.model.bridge.fdt.num_tokens, cfg.model.bridge.fdt.dim = 16, 32
    tokenizer = Tokenizer.train(["a red circle", "a blue square"], cfg.prep.text)
    return CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, tokenizer))


def group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_no_decay_on_norms_biases_logit_scale_and_positions() -> None:
    model = tiny_model()
    groups = group_names(model, build_optimizer(model, TrainConfig(weight_decay=0.1)))
    no_decay, decay = groups["no_decay"], groups["decay"]
    assert "bridge.logit_scale.log_scale" in no_decay
    assert "encoders.image.vit.positional_embedding" in no_decay
    assert "encoders.text.positional_embedding" in no_decay
    assert any(n.endswith("ln_1.weight") for n in no_decay)
    assert any(n.endswith("attn.qkv.bias") for n in no_decay)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
    assert "bridge.proj.image.weight" in decay
    assert any(n.endswith("attn.qkv.weight") for n in decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    assert not decay & no_decay


def test_group_settings_come_from_the_config() -> None:
    model = tiny_model()
    cfg = TrainConfig(weight_decay=0.2, betas=(0.8, 0.9), eps=1e-6)
    optimizer = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in optimizer.param_groups)


def test_bridge_no_weight_decay_is_honoured() -> None:
    model = tiny_model("fdt")
    model.bridge.cfg.fdt.token_weight_decay = False
    assert "bridge.tokens" in no_decay_names(model)
    model.bridge.cfg.fdt.token_weight_decay = True
    assert "bridge.tokens" not in no_decay_names(model)


def test_frozen_parameters_are_left_out() -> None:
    model = tiny_model()
    model.encoders.image.vit.positional_embedding.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig())
    assert "encoders.image.vit.positional_embedding" not in set.union(*group_names(model, optimizer).values())


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_start_lr=1e-4, min_lr=1e-5, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(5, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    assert lr_at(500, cfg) == pytest.approx(1e-5)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_schedule_without_warmup_or_decay_steps() -> None:
    assert lr_at(0, TrainConfig(lr=1e-3, warmup_steps=0, steps=100)) == pytest.approx(1e-3)
    assert lr_at(3, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5, steps=5)) < 1e-3
    assert lr_at(5, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5, steps=5)) == pytest.approx(1e-4)


def test_scheduler_sets_every_group_and_resumes_from_its_state() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, steps=20)
    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = WarmupCosine(optimizer, cfg)
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)
    for _ in range(7):
        scheduler.step()
    assert all(g["lr"] == pytest.approx(lr_at(7, cfg)) for g in optimizer.param_groups)
    other = WarmupCosine(build_optimizer(model, cfg), cfg)
    other.load_state_dict(scheduler.state_dict())
    assert other.optimizer.param_groups[1]["lr"] == pytest.approx(lr_at(7, cfg))
    assert math.isclose(other.get_last_lr(), scheduler.get_last_lr())
