"""The trainer end to end on generated data: learning, run folder, exact resume, time budget, NaN stop."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from codebridge.config import Config, ConfigError, load_config, save_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.models.model import CodeBridgeModel
from codebridge.train import TrainingDiverged, train
from codebridge.train.checkpoint import TOKENIZER_DIR, find_checkpoint, load_checkpoint
from codebridge.train.optim import WarmupCosine, build_optimizer

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")  # 12 concepts: chance is 1/12


def draw(shape: str, rgb: tuple[int, int, int], rng: random.Random, size: int = 32) -> Image.Image:
    """One shape of random size and position on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    r = rng.randint(7, 12)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=rgb)
    else:
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
    return image


def write_shapes(folder: Path, name: str, per_concept: int, seed: int) -> Path:
    """A JSONL data set of coloured shapes with two captions each; returns the .jsonl path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for concept, ((colour, rgb), shape) in enumerate((c, s) for c in COLOURS.items() for s in SHAPES):
        for k in range(per_concept):
            file = f"{name}-{colour}-{shape}-{k}.png"
            draw(shape, rgb, rng).save(folder / file)
            rows.append(
                {"image": file, "text": [f"a {colour} {shape}", f"{shape}, {colour}"], "labels": {"concept": concept}}
            )
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The machine is shared; one intra-op thread is also the fastest for models this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shapes")
    return {"train": write_shapes(folder, "train", 8, seed=0), "val": write_shapes(folder, "val", 3, seed=1)}


def tiny_config(shapes: dict[str, Path], out: Path, *overrides: str) -> Config:
    """A model that learns the 12 shapes in about a hundred steps of a few milliseconds each."""
    return load_config(
        None,
        [
            f"data.train={shapes['train']}",
            f"data.val={shapes['val']}",
            f"output_dir={out}",
            "prep.image={size: 16, augment: false}",
            "prep.text={context_length: 8, vocab_size: 300}",
            "model.image={patch_size: 4, width: 32, depth: 1, heads: 2}",
            "model.text={width: 32, depth: 1, heads: 2}",
            "model.bridge.embed_dim=32",
            "train={batch_size: 16, steps: 100, lr: 3.0e-3, warmup_steps: 5, log_every: 5, checkpoint_every: 40}",
            "train.progress=false",
            *overrides,
        ],
    )


def read_metrics(run: Path, kind: str = "train") -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def test_trains_and_writes_the_run_folder(shapes: dict[str, Path], tmp_path: Path) -> None:
    run = train(tiny_config(shapes, tmp_path / "run", "train.eval_every=50"))
    assert run == tmp_path / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(5, 101, 5))
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert {"loss/contrastive/image-text", "logit_scale", "grad_norm"} <= set(records[0]["parts"])
    assert records[0]["lr"] == pytest.approx(4 / 5 * 3e-3) and records[-1]["lr"] < 1e-5  # step 5 ran at lr_at(4)
    assert all(r["samples_per_s"] > 0 for r in records) and records[-1]["samples_seen"] == 1600

    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [50, 100]
    final = json.loads((run / "eval.json").read_text())
    assert final == evals[-1]["metrics"]
    # 12 concepts: a caption has 3 matching val images (chance R@1 1/12), an image 2 matching captions (2/24)
    assert final["text_to_image_R@1"] > 3 / 12 and final["image_to_text_R@1"] > 3 / 12

    model = CodeBridgeModel.load(run / "model")
    last = load_file(run / "checkpoints" / "step_000100" / "model.safetensors")
    assert all(torch.equal(value, last[name]) for name, value in model.state_dict().items())
    assert load_config(run / "config.yaml").train.steps == 100
    assert "step 100" in (run / "out.log").read_text() and "collapsed" not in (run / "out.log").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000080", "step_000100"]
    assert find_checkpoint(run, "latest").name == "step_000100"


def test_existing_run_needs_resume(shapes: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(shapes, tmp_path / "run", "train.steps=2")
    train(cfg)
    with pytest.raises(ConfigError, match="--resume latest"):
        train(cfg)


def test_resume_after_a_stop_matches_an_uninterrupted_run(shapes: dict[str, Path], tmp_path: Path) -> None:
    """Stopped by its time budget after one step (mid-epoch, mid-accumulation schedule), then resumed to the end."""
    overrides = ("train.steps=9", "train.accum_steps=2", "train.log_every=1", "train.checkpoint_every=4")
    straight = train(tiny_config(shapes, tmp_path / "straight", *overrides))

    stopped = tmp_path / "stopped"
    train(tiny_config(shapes, stopped, *overrides, "train.max_minutes=1.0e-9"))
    assert [r["step"] for r in read_metrics(stopped)] == [1]
    assert find_checkpoint(stopped, "latest").name == "step_000001"
    train(tiny_config(shapes, stopped, *overrides), resume="latest")

    def numbers(run: Path) -> list[tuple]:
        return [(r["step"], r["epoch"], r["lr"], r["loss"], r["parts"]) for r in read_metrics(run)]

    assert numbers(stopped) == numbers(straight)
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(stopped / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(shapes: dict[str, Path], tmp_path: Path) -> None:
    """``codebridge train`` killed with SIGKILL once its first checkpoint exists, then ``--resume latest``."""
    overrides = ("train.steps=400", "train.log_every=10", "train.checkpoint_every=10")
    straight = train(tiny_config(shapes, tmp_path / "straight", *overrides))

    killed = tmp_path / "killed"
    save_config(tiny_config(shapes, killed, *overrides), tmp_path / "killed.yaml")
    command = [sys.executable, "-m", "codebridge", "train", "--config", str(tmp_path / "killed.yaml")]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model").exists()

    train(tiny_config(shapes, killed, *overrides), resume="latest")
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(killed)] == [r["loss"] for r in read_metrics(straight)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    shapes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss is poisoned from step 4 on (fault injection: a real divergence takes long to provoke)."""
    real_loss = CodeBridgeModel.loss

    def diverging_loss(self: CodeBridgeModel, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
        loss, parts = real_loss(self, batch, step)
        return (loss * float("nan"), parts) if step >= 3 else (loss, parts)

    monkeypatch.setattr(CodeBridgeModel, "loss", diverging_loss)
    cfg = tiny_config(shapes, tmp_path / "run", "train.steps=10", "train.checkpoint_every=2")
    with pytest.raises(TrainingDiverged, match=r"at step 4: loss is nan \(loss parts: .*image-text=") as caught:
        train(cfg)
    good = tmp_path / "run" / "checkpoints" / "step_000002"
    assert caught.value.checkpoint == good and str(good) in str(caught.value)
    assert find_checkpoint(tmp_path / "run", "latest") == good
    assert not (tmp_path / "run" / "model").exists()

    tokenizer = Tokenizer.load(good / TOKENIZER_DIR)
    model = CodeBridgeModel(cfg, cfg.data.modalities, Preprocessors(cfg.prep, tokenizer))
    optimizer = build_optimizer(model, cfg.train)
    assert load_checkpoint(good, model, optimizer, WarmupCosine(optimizer, cfg.train)).step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_train_settings_name_the_field(shapes: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(shapes, tmp_path / "run")
    cfg.train.accum_steps = 0  # changed in Python after loading: train() validates again before writing anything
    with pytest.raises(ConfigError, match=r"train\.accum_steps: 0 is out of range; expected an integer >= 1"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # inductor generates and builds C++ for each tower: about a minute of CPU when its cache is cold
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_towers_train_like_eager_ones(shapes: dict[str, Path], tmp_path: Path) -> None:
    """train.compile (inductor, real code generation; tests/test_compile.py checks the same at dynamo + AOT
    autograd level in seconds) gives the eager losses step by step, and a model folder that
    loads into an eager model with the same weights (Module.compile keeps the parameter names)."""
    settings = ("train.steps=4", "train.log_every=1", "train.checkpoint_every=0", "data.val=null")
    eager = read_metrics(train(tiny_config(shapes, tmp_path / "eager", *settings)))
    compiled_run = train(tiny_config(shapes, tmp_path / "compiled", *settings, "train.compile=true"))
    compiled = read_metrics(compiled_run)
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    eager_state = load_file(tmp_path / "eager" / "model" / "model.safetensors")
    compiled_state = CodeBridgeModel.load(compiled_run / "model").state_dict()
    assert set(compiled_state) == set(eager_state)
    for name, value in compiled_state.items():
        torch.testing.assert_close(value, eager_state[name], rtol=1e-3, atol=1e-4)
