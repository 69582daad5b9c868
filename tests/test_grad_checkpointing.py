"""Activation checkpointing (``train.grad_checkpointing``): every tower gives the same loss and gradients with and
without it, in float64, while fewer activation bytes are kept for the backward pass."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from codebridge.config import Config, ConfigError, load_config
from codebridge.models.encoders import ENCODERS
from codebridge.train import train
from codebridge.train.memory import checkpoint_blocks, checkpoint_towers
from helpers import small_config
from test_trainer import one_thread, shapes, tiny_config  # noqa: F401  (fixtures)

B = 3


def encoder_config() -> Config:
    cfg = small_config()
    for enc in (cfg.model.image, cfg.model.text, cfg.model.audio):
        enc.depth = 3
    cfg.model.video.temporal_depth = 2
    return cfg


def inputs(modality: str, cfg: Config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        return {"pixels": torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)}
    if modality == "video":
        return {"frames": torch.randn(B, cfg.prep.video.frames, 3, 16, 16, generator=g, dtype=torch.float64)}
    if modality == "text":
        mask = torch.arange(10)[None] < torch.tensor([[10], [6], [3]])
        return {"ids": torch.randint(4, 300, (B, 10), generator=g) * mask, "mask": mask}
    frames = 20
    mask = torch.arange(frames)[None] < torch.tensor([[20], [13], [7]])
    return {"mel": torch.randn(B, frames, cfg.prep.audio.n_mels, generator=g, dtype=torch.float64), "mask": mask}


def run(tower: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """A loss over every output of the tower (tokens and summary), its gradients and the bytes saved for backward."""
    tower.zero_grad(set_to_none=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)  # dropout in transformers towers: the same masks with and without checkpointing
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f = tower(batch)
        weights = torch.linspace(-1, 1, f.tokens[0].numel(), dtype=f.tokens.dtype).view_as(f.tokens[0])
        loss = (f.tokens * weights * f.mask[..., None]).sum() + f.summary.square().sum()
    loss.backward()
    grads = {n: p.grad for n, p in tower.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


def assert_same_training_with_less_memory(build: Callable[[], nn.Module], batch: dict[str, torch.Tensor]) -> None:
    plain = build()
    loss, grads, saved = run(plain, batch)
    recomputing = build()
    assert checkpoint_blocks(recomputing) > 0
    loss_c, grads_c, saved_c = run(recomputing, batch)
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=0)
    assert grads_c.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    assert saved_c < 0.7 * saved, (saved_c, saved)


@pytest.mark.parametrize("modality", ["image", "text", "audio", "video"])
def test_scratch_towers_train_identically_and_keep_fewer_activations(modality: str) -> None:
    cfg = encoder_config()

    def build() -> nn.Module:
        torch.manual_seed(0)
        return ENCODERS.get(modality)(cfg).double().train()

    assert_same_training_with_less_memory(build, inputs(modality, cfg))


def test_transformers_tower_uses_its_own_checkpointing(tmp_path: Path) -> None:
    """A ``transformers`` BERT (dropout on, 2 blocks) as the text tower."""
    pytest.importorskip("transformers")
    from codebridge.models.encoders.hf_text import HFTextEncoder
    from test_pretrained import write_bert

    folder = write_bert(tmp_path / "bert")
    cfg = small_config()
    cfg.model.text = load_config(None, [f"model.text={{encoder: hf-text, path: {folder}}}"]).model.text

    def build() -> nn.Module:
        return HFTextEncoder(cfg).double().train()

    batch = inputs("text", cfg)
    batch["ids"] = batch["ids"] % 30
    assert_same_training_with_less_memory(build, batch)


def test_a_tower_without_blocks_is_refused() -> None:
    encoders = nn.ModuleDict({"image": nn.Linear(2, 2)})
    with pytest.raises(ConfigError, match=r"train.grad_checkpointing: the image encoder \(Linear\) has no transformer"):
        checkpoint_towers(encoders, ["image"])


def test_only_the_run_modalities_can_be_named(shapes, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=r"train.grad_checkpointing=\['audio'\] must name modalities of data"):
        tiny_config(shapes, tmp_path, "train.grad_checkpointing=[audio]")


def test_a_run_with_checkpointing_matches_one_without(shapes, tmp_path: Path) -> None:  # noqa: F811
    """The trainer switches it on: the same losses and weights as the plain run (fp32, a few steps)."""
    common = ("train.steps=4", "train.log_every=1", "data.val=null")
    plain = train(tiny_config(shapes, tmp_path / "plain", *common))
    both = train(tiny_config(shapes, tmp_path / "ckpt", *common, "train.grad_checkpointing=[image, text]"))

    def losses(run_dir: Path) -> list[float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]

    assert len(losses(plain)) == 4
    assert losses(both) == pytest.approx(losses(plain), rel=1e-6)
