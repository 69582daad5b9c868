"""Pretrained per-frame video towers (hf-video): a tiny randomly initialised ViT written here with ``save_pretrained``
runs on every frame of a video-text run, locked, saves, loads offline and evaluates; its tokens are the image
tower's summaries of each frame; ``prep.video`` takes the checkpoint's size, mean and std."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from codebridge.config import ConfigError, load_config
from codebridge.eval.run import evaluate_model
from codebridge.models.model import CodeBridgeModel
from codebridge.train import train
from test_pretrained import TINY, write_vit
from test_trainer import COLOURS, SHAPES, draw, one_thread, tiny_config  # noqa: F401 (one_thread: autouse fixture)
from test_video import write_frames

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 4-frame clip of a shape jumping around per colour and shape, captioned with both."""
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for name, seed in (("train", 0), ("val", 1)):
        rng, rows = random.Random(seed), []
        for concept, ((colour, rgb), shape) in enumerate((c, s) for c in COLOURS.items() for s in SHAPES):
            file = f"{name}-{colour}-{shape}.mp4"
            write_frames(folder / file, [np.asarray(draw(shape, rgb, rng)) for _ in range(4)])
            rows.append({"video": file, "text": [f"a {colour} {shape}"], "labels": {"concept": concept}})
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def video_config(data: dict[str, Path], out: Path, tower: Path, *overrides: str):
    return tiny_config(
        data,
        out,
        "data.modalities=[video, text]",
        f"model.video={{encoder: hf-video, path: {tower}, lock: true}}",
        "prep.video.frames=3",
        "train={steps: 4, batch_size: 6}",
        "train.eval_every=0",
        *overrides,
    )


def test_video_text_trains_locked_saves_loads_offline_and_evaluates(clips, tmp_path: Path, monkeypatch) -> None:
    tower = write_vit(tmp_path / "vit")
    run = train(video_config(clips, tmp_path / "run", tower))
    prep = load_config(run / "config.yaml").prep
    assert (prep.video.size, prep.video.mean, prep.video.std) == (16, (0.4,) * 3, (0.3,) * 3)
    assert prep.image.mean == (0.5,) * 3  # the image modality keeps its own normalisation
    original = transformers.ViTModel.from_pretrained(tower).state_dict()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for f in tower.iterdir():  # the model folder alone suffices
        f.unlink()
    tower.rmdir()
    model = CodeBridgeModel.load(run / "model")
    state = model.state_dict()
    assert all(torch.equal(state[f"encoders.video.hf.{n}"], v) for n, v in original.items())  # locked
    frames = np.full((5, 20, 20, 3), 200, dtype=np.uint8)
    emb = model.encode("video", [frames, clips["val"].parent / "val-red-circle.mp4"])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    metrics = evaluate_model(model, str(clips["val"]), "retrieval", batch_size=6)
    assert 0 <= metrics["text_to_video_R@1"] <= 1


def test_tokens_are_the_image_towers_summary_of_each_frame(tmp_path: Path) -> None:
    from codebridge.data.modalities.video import VideoProcessor
    from codebridge.models.encoders.hf_video import HFVideoEncoder
    from codebridge.models.encoders.hf_vision import HFVisionEncoder
    from codebridge.models.encoders.pretrained import adopt_pretrained

    tower = tmp_path / "clip"
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=16, patch_size=8, **TINY)).save_pretrained(
        tower
    )
    cfg = adopt_pretrained(
        load_config(
            None,
            [
                "data.modalities=[image, video]",
                f"model.image={{encoder: hf-vision, path: {tower}}}",
                f"model.video={{encoder: hf-video, path: {tower}}}",
                "prep.video.frames=3",
            ],
        )
    )
    image, video = HFVisionEncoder(cfg).eval(), HFVideoEncoder(cfg).eval()
    video.load_state_dict(image.state_dict())
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, (t, 24, 24, 3), dtype=np.uint8) for t in (3, 5)]
    frames = torch.stack([VideoProcessor(cfg.prep.video, cfg.prep.image)(r, train=False) for r in raw])
    with torch.no_grad():
        f = video({"frames": frames})
        per_frame = image({"pixels": frames.flatten(0, 1)}).summary.view(2, 3, -1)
    assert f.tokens.shape == (2, 3, 32) and f.mask.all()
    torch.testing.assert_close(f.tokens, per_frame)  # CLIP: the pooler output of each frame
    torch.testing.assert_close(f.summary, per_frame.mean(1))


def test_conflicting_frame_preprocessing_is_named(clips, tmp_path: Path) -> None:
    tower = write_vit(tmp_path / "vit")
    with pytest.raises(ConfigError, match=r"prep.video.std=\[0.2, 0.2, 0.2\] conflicts .*0.3"):
        train(video_config(clips, tmp_path / "a", tower, "prep.video.std=[0.2, 0.2, 0.2]"))
    with pytest.raises(ConfigError, match=r"prep.video.size=24 conflicts with the pretrained tower's 16"):
        train(video_config(clips, tmp_path / "b", tower, "prep.video.size=24"))


def test_frames_are_normalised_on_the_device_with_the_towers_mean_and_std() -> None:
    from codebridge.data.modalities.base import MODALITIES

    prep = load_config(None, ["prep.video.mean=[0.4, 0.4, 0.4]", "prep.video.std=[0.3, 0.3, 0.3]"]).prep
    frames = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    out = MODALITIES.get("video").on_device({"frames": frames}, prep)["frames"]
    torch.testing.assert_close(out, (frames.float() / 255 - 0.4) / 0.3)
