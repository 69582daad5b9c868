"""Checkpoints: exact round trip of weights, optimizer, schedule and RNG; atomic pointer; pruning; clear errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from codebridge.config import ConfigError, TrainConfig
from codebridge.data.modalities.text import TextPrep
from codebridge.data.preprocess import Tokenizer
from codebridge.train.checkpoint import (
    CHECKPOINTS,
    LATEST,
    TOKENIZER_DIR,
    TrainState,
    find_checkpoint,
    load_checkpoint,
    load_rng,
    save_checkpoint,
)
from codebridge.train.optim import WarmupCosine, build_optimizer
from codebridge.train.rng import preserved_rng, seed_everything

CFG = TrainConfig(lr=1e-2, warmup_steps=2, steps=20)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("seen", torch.zeros(()))


def build() -> tuple[Net, torch.optim.Optimizer, WarmupCosine]:
    torch.manual_seed(0)
    net = Net()
    optimizer = build_optimizer(net, CFG)
    return net, optimizer, WarmupCosine(optimizer, CFG)


def train_steps(net: Net, optimizer: torch.optim.Optimizer, scheduler: WarmupCosine, n: int) -> list[float]:
    """Steps whose inputs come from every global generator, so an RNG mismatch changes the weights."""
    draws = []
    for _ in range(n):
        noise = random.random() + float(np.random.rand())
        x = torch.randn(8, 4) + noise
        optimizer.zero_grad()
        net.norm(net.lin(x)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        net.seen += 1
        draws.append(noise)
    return draws


def save(run: Path, step: int, net: Net, optimizer: torch.optim.Optimizer, scheduler: WarmupCosine, keep: int = 2):
    return save_checkpoint(run, TrainState(step=step, batches=2 * step), net, optimizer, scheduler, keep=keep)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    seed_everything(1)
    train_steps(net, optimizer, scheduler, 3)
    path = save(tmp_path, 3, net, optimizer, scheduler)
    draws = train_steps(net, optimizer, scheduler, 4)

    seed_everything(99)  # a fresh process would start from other generator states
    net2, optimizer2, scheduler2 = build()
    state = load_checkpoint(path, net2, optimizer2, scheduler2)
    load_rng(path)
    assert (state.step, state.batches, state.world_size) == (3, 6, 1)
    assert train_steps(net2, optimizer2, scheduler2, 4) == draws
    for (name, a), b in zip(net.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert optimizer2.param_groups[0]["betas"] == CFG.betas
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_each_rank_resumes_at_its_own_data_position(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    path = save(tmp_path, 2, net, optimizer, scheduler)
    assert json.loads((path / "data" / "rank_0.json").read_text()) == {"batches": 4, "stream": {}}
    (path / "data" / "rank_0.json").write_text('{"batches": 5}')  # this rank left out one all-bad batch
    assert load_checkpoint(path, *build()).batches == 5
    stream = {"epoch": 1, "consumed": [3, 6], "next_worker": 1}  # streamed shards: per-worker position
    (path / "data" / "rank_0.json").write_text(json.dumps({"batches": 5, "stream": stream}))
    assert load_checkpoint(path, *build()).stream == stream
    shutil.rmtree(path / "data")  # a checkpoint from before per-rank positions: rank 0's from trainer.json
    assert load_checkpoint(path, *build()).batches == 4


def test_files_are_pickle_free(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    train_steps(net, optimizer, scheduler, 1)
    path = save(tmp_path, 1, net, optimizer, scheduler)
    assert set(load_file(path / "model.safetensors")) == {"lin.weight", "lin.bias", "norm.weight", "norm.bias", "seen"}
    tensors = load_file(path / "optimizer.safetensors")
    assert {"0.exp_avg", "0.exp_avg_sq", "0.step"} <= set(tensors)
    meta = json.loads((path / "optimizer.json").read_text())
    assert [g["name"] for g in meta["param_groups"]] == ["decay", "no_decay"]
    assert json.loads((path / "trainer.json").read_text())["scheduler"] == {"step_count": 1}
    assert "python" in json.loads((path / "rng" / "rank_0.json").read_text())
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.pkl"))


def test_latest_pointer_and_pruning(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    for step in (2, 4, 6):
        save(tmp_path, step, net, optimizer, scheduler, keep=2)
    root = tmp_path / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_000004", "step_000006"]
    assert (root / LATEST).read_text().strip() == "step_000006"
    assert find_checkpoint(tmp_path, "latest") == root / "step_000006"
    save(tmp_path, 8, net, optimizer, scheduler, keep=0)  # 0 keeps everything
    assert len(list(root.glob("step_*"))) == 3


def test_interrupted_write_leaves_the_last_checkpoint(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    save(tmp_path, 2, net, optimizer, scheduler)
    partial = tmp_path / CHECKPOINTS / ".tmp_step_000004"  # what a kill during the next save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert find_checkpoint(tmp_path, "latest").name == "step_000002"
    save(tmp_path, 4, net, optimizer, scheduler)
    assert not partial.exists()
    assert find_checkpoint(tmp_path, "latest").name == "step_000004"


def test_find_checkpoint_accepts_folders_and_explains_misses(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    path = save(tmp_path / "run", 2, net, optimizer, scheduler)
    assert find_checkpoint(tmp_path / "elsewhere", str(path)) == path
    assert find_checkpoint(tmp_path / "elsewhere", str(tmp_path / "run")) == path
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*empty.*'latest'"):
        find_checkpoint(tmp_path / "empty", "latest")


def test_other_world_size_is_refused(tmp_path: Path) -> None:
    net, optimizer, scheduler = build()
    path = save_checkpoint(tmp_path, TrainState(step=1, world_size=2), net, optimizer, scheduler)
    with pytest.raises(ConfigError, match=r"written by 2 process.*--nproc_per_node"):
        load_checkpoint(path, *build())


def test_tokenizer_is_saved_alongside(tmp_path: Path) -> None:
    tokenizer = Tokenizer.train(["a red circle", "a blue square"], TextPrep(vocab_size=270))
    net, optimizer, scheduler = build()
    path = save_checkpoint(tmp_path, TrainState(step=1), net, optimizer, scheduler, tokenizer=tokenizer)
    loaded = Tokenizer.load(path / TOKENIZER_DIR)
    assert torch.equal(loaded.encode(["a red square"])[0], tokenizer.encode(["a red square"])[0])


def test_preserved_rng_leaves_generators_untouched() -> None:
    seed_everything(3)
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(1)
    after = (random.random(), float(np.random.rand()), torch.rand(1).item())
    seed_everything(3)
    assert after == (random.random(), float(np.random.rand()), torch.rand(1).item())
