"""Image preprocessing: decoding, alpha compositing, shape/normalisation, eval determinism, train augmentation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codebridge.config import ImagePrep
from codebridge.data.preprocess.image import ImageProcessor


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pattern(width: int = 48, height: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8 [H,W,3]) so crops and jitter change the output."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def test_solid_colour_is_resized_and_normalised() -> None:
    prep = ImagePrep(size=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.5))
    img = Image.new("RGB", (40, 30), (255, 0, 128))
    x = ImageProcessor(prep)(img, train=False)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_eval_keeps_the_centre_square_of_wide_images() -> None:
    img = np.zeros((20, 60, 3), dtype=np.uint8)
    img[:, 14:46] = 255  # the middle square (and the resampling filter's reach around it) is white, the sides black
    x = ImageProcessor(ImagePrep(size=8, mean=(0, 0, 0), std=(1, 1, 1)))(img, train=False)
    assert torch.allclose(x, torch.ones_like(x), atol=1e-3)


def test_eval_is_deterministic_and_ignores_the_generator() -> None:
    proc = ImageProcessor(ImagePrep(size=16))
    img = pattern()
    a = proc(img, train=False, generator=torch.Generator().manual_seed(1))
    b = proc(img, train=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_train_augmentation_varies_with_the_generator_and_reproduces_with_its_seed() -> None:
    proc = ImageProcessor(ImagePrep(size=16))
    img = pattern()
    runs = [proc(img, train=True, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert runs[0].shape == (3, 16, 16)
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2], atol=1e-3)
    assert not torch.allclose(runs[0], proc(img, train=False), atol=1e-3)


def test_train_without_augment_equals_eval() -> None:
    proc = ImageProcessor(ImagePrep(size=16, augment=False))
    img = pattern()
    assert torch.equal(proc(img, train=True, generator=torch.Generator().manual_seed(0)), proc(img, train=False))


def test_full_crop_without_jitter_is_the_identity_augmentation() -> None:
    proc = ImageProcessor(ImagePrep(size=16, crop_scale=(1.0, 1.0), color_jitter=0.0))
    img = pattern()
    assert torch.allclose(proc(img, train=True, generator=torch.Generator().manual_seed(0)), proc(img, train=False))


def test_augmentation_never_mirrors() -> None:
    """A left-dark/right-bright image stays left-dark/right-bright under every augmentation draw."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:, 16:] = 200
    proc = ImageProcessor(ImagePrep(size=16, crop_scale=(0.9, 1.0), color_jitter=0.1))
    for seed in range(20):
        x = proc(img, train=True, generator=torch.Generator().manual_seed(seed))
        assert x[:, :, :4].mean() < x[:, :, -4:].mean()


def test_load_composites_alpha_on_the_background(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue
    path = tmp_path / "a.png"
    rgba.save(path)
    proc = ImageProcessor(ImagePrep(background=(0, 255, 0)))
    for src in (str(path), path.read_bytes()):
        img = proc.load(src)
        assert img.mode == "RGB" and img.size == (4, 2)
        assert img.getpixel((0, 0)) == (255, 0, 0)
        assert img.getpixel((3, 1)) == (0, 255, 0)
        r, g, b = img.getpixel((1, 0))
        assert r == 0 and abs(g - 127) <= 1 and abs(b - 128) <= 1


def test_load_converts_greyscale_and_palette_to_rgb() -> None:
    proc = ImageProcessor(ImagePrep())
    assert proc.load(png_bytes(Image.new("L", (3, 3), 90))).getpixel((1, 1)) == (90, 90, 90)
    assert proc.load(png_bytes(Image.new("P", (3, 3), 0))).mode == "RGB"


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated", "empty"])
def test_load_rejects_bad_files_with_the_reason(tmp_path: Path, kind: str) -> None:
    good = png_bytes(Image.fromarray(pattern()))
    path = tmp_path / f"{kind}.png"
    content = {"corrupt": b"not an image at all", "truncated": good[: len(good) // 2], "empty": b""}
    if kind != "missing":
        path.write_bytes(content[kind])
    with pytest.raises(ValueError, match=r"does not exist|cannot decode|empty"):
        ImageProcessor(ImagePrep()).load(str(path))
