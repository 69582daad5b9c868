"""The GPU input pipeline: the loader delivers uint8 pictures (+ jitter factors), the model finishes them once on
its device, and the result equals the old all-on-CPU float path item by item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codebridge
from codebridge.data.dataset import SampleDataset, collate, derive_seed, training_loader
from codebridge.data.modalities import modality
from codebridge.data.modalities.image import Augmentation, ImagePrep, ImageProcessor, centre_square
from codebridge.data.modalities.video import VideoPrep, VideoProcessor, uniform_indices
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.data.sample import Sample
from codebridge.models.model import CodeBridgeModel
from helpers import small_config

torch.set_num_threads(1)
PREP = ImagePrep(size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), crop_scale=(0.5, 1.0), color_jitter=0.4)
TOLERANCE = 1e-5  # far below the 1/255/std of one uint8 step: no rounding moved (PIL's resize always wrote uint8)
CAPTIONS = ["a red square", "a blue circle", "green triangle", "the yellow star"]


def old_float_path(img: np.ndarray, aug: Augmentation | None, prep: ImagePrep) -> torch.Tensor:
    """The per-item CPU preprocessing before the split (as of 0d09f0c): crop+resize, float, jitter, normalise."""
    pil = Image.fromarray(img)
    box = aug.box if aug is not None else centre_square(*pil.size)
    resized = pil.resize((prep.size, prep.size), Image.Resampling.BICUBIC, box=box)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if aug is not None:
        luma = torch.tensor([0.299, 0.587, 0.114])
        x = (x * aug.brightness).clamp(0, 1)
        mean = torch.tensordot(luma, x, dims=1).mean()
        x = ((x - mean) * aug.contrast + mean).clamp(0, 1)
        grey = torch.tensordot(luma, x, dims=1)[None]
        x = ((x - grey) * aug.saturation + grey).clamp(0, 1)
    return (x - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)


def picture(seed: int, width: int = 40, height: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batch_finished_on_device_equals_the_old_float_path(train: bool) -> None:
    proc, spec = ImageProcessor(PREP), modality("image")
    images = [picture(seed) for seed in range(6)]
    entries, expected = [], []
    for i, img in enumerate(images):
        entries.append(proc.entry(img, train, torch.Generator().manual_seed(i)))
        aug = proc.augmentation(img.shape[1], img.shape[0], train, torch.Generator().manual_seed(i))
        expected.append(old_float_path(img, aug, PREP))
    batch = spec.collate(entries)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (6, 3, 16, 16)
    assert ("jitter" in batch) == train
    prep = small_config().prep
    prep.image = PREP
    finished = spec.on_device(batch, prep)
    assert set(finished) == {"pixels"} and finished["pixels"].dtype == torch.float32
    torch.testing.assert_close(finished["pixels"], torch.stack(expected), rtol=0, atol=TOLERANCE)
    assert torch.equal(spec.on_device(finished, prep)["pixels"], finished["pixels"])  # never normalised twice


def test_video_clips_share_one_draw_and_match_the_old_path_per_frame() -> None:
    video = VideoProcessor(VideoPrep(frames=3, size=16), PREP)
    clip = np.stack([picture(seed, 32, 24) for seed in range(5)])
    entry = video.entry(clip, train=True, generator=torch.Generator().manual_seed(7))
    aug = video.image.augmentation(32, 24, True, torch.Generator().manual_seed(7))
    expected = torch.stack([old_float_path(clip[i], aug, video.image.prep) for i in uniform_indices(5, 3)])
    assert entry["frames"].dtype == torch.uint8 and entry["jitter"].shape == (3,)
    prep = small_config().prep
    prep.image = PREP
    batch = modality("video").collate([entry, entry])
    finished = modality("video").on_device(batch, prep)["frames"]
    torch.testing.assert_close(finished, torch.stack([expected, expected]), rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for seed in range(len(CAPTIONS)):
        Image.fromarray(picture(seed)).save(root / f"{seed}.png")
        paths.append(str(root / f"{seed}.png"))
    return paths


def _model() -> CodeBridgeModel:
    cfg = small_config()
    torch.manual_seed(0)
    return CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text)))


def test_the_training_step_normalises_exactly_once(files: list[str]) -> None:
    """The loss of a loader batch (uint8) equals the loss of the same batch with the old float pixels; a step that
    skipped normalisation or did it twice would differ."""
    model = _model().train()
    cfg = model.cfg
    cfg.train.batch_size = len(files)
    samples = [Sample(f, f, {"image": f, "text": [c]}) for f, c in zip(files, CAPTIONS, strict=True)]
    batch = next(iter(training_loader(cfg, samples, model.preprocessors)))
    assert batch["image"]["pixels"].dtype == torch.uint8
    proc, prep = model.preprocessors["image"], cfg.prep.image
    old = []
    for i in batch["index"].tolist():
        img = proc.decode(files[i])
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, i, modality("image").stream))
        old.append(old_float_path(img, proc.augmentation(img.shape[1], img.shape[0], True, generator), prep))
    floats = {**batch, "image": {"pixels": torch.stack(old)}}
    torch.manual_seed(1)
    loss, _ = model.loss(batch)
    torch.manual_seed(1)
    reference, _ = model.loss(floats)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_saved_model_encodes_files_and_eval_batches_like_the_float_path(files: list[str], tmp_path: Path) -> None:
    model = _model().eval()
    loaded = codebridge.load(model.save(tmp_path / "model"))
    proc = loaded.preprocessors["image"]
    old = torch.stack([old_float_path(proc.decode(f), None, loaded.cfg.prep.image) for f in files])
    reference = loaded.encode("image", {"pixels": old})
    torch.testing.assert_close(loaded.encode("image", files), reference, rtol=1e-5, atol=1e-5)
    dataset = SampleDataset([Sample(f, f, {"image": f}) for f in files], ["image"], loaded.preprocessors, False)
    entry = collate([dataset[i] for i in range(len(files))])["image"]
    assert entry["pixels"].dtype == torch.uint8 and "jitter" not in entry
    torch.testing.assert_close(loaded.encode("image", entry), reference, rtol=1e-5, atol=1e-5)


def test_training_loader_prefetches_with_workers_and_pins_for_a_gpu(files: list[str]) -> None:
    cfg = small_config()
    cfg.train.batch_size, cfg.data.num_workers, cfg.data.prefetch = 2, 1, 3
    samples = [Sample(f, f, {"image": f, "text": [c]}) for f, c in zip(files, CAPTIONS, strict=True)]
    prep = Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text))
    workers = training_loader(cfg, samples, prep, pin_memory=True)._loader
    assert (workers.prefetch_factor, workers.pin_memory, workers.persistent_workers) == (3, True, True)
    cfg.data.num_workers = 0  # torch refuses a prefetch factor without workers: it is left out, not an error
    inline = training_loader(cfg, samples, prep)._loader
    assert (inline.prefetch_factor, inline.pin_memory) == (None, False)
    assert next(iter(inline))[0]["image"]["pixels"].dtype == torch.uint8
