"""Image preprocessing in PIL/numpy/torch: decode, composite alpha, crop+resize, colour jitter, normalise.

Train-time augmentation is a random resized crop and colour jitter; never a horizontal flip, because emoji
(and the text in many images) are not mirror-symmetric. The augmentation is drawn once as an ``Augmentation``
and applied by ``apply``, so a video can use the same parameters for all of its frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from codebridge.config import ImagePrep
from codebridge.data.preprocess.source import Source, as_file, describe

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's "L" conversion


@dataclass(frozen=True)
class Augmentation:
    """One draw of the train-time augmentation: the crop box and the three jitter factors (1.0 = unchanged)."""

    box: Box
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


def centre_square(width: int, height: int) -> Box:
    """The largest centred square: eval keeps the middle of non-square images instead of squashing them."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def random_crop_box(width: int, height: int, scale: tuple[float, float], generator: torch.Generator | None) -> Box:
    """A box covering a random fraction ``scale`` of the area, aspect ratio log-uniform in [3/4, 4/3].

    Ten tries to fit the box in the image, then the centre square (as torchvision's RandomResizedCrop).
    """
    area = width * height
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3), generator))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            left, top = _uniform(0, width - w, generator), _uniform(0, height - h, generator)
            return (left, top, left + w, top + h)
    return centre_square(width, height)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[3,H,W] -> [1,H,W] grey level."""
    return torch.tensordot(x.new_tensor(LUMA), x, dims=1)[None]


def jitter(x: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """Brightness, contrast, saturation on [3,H,W] in [0, 1], clamped after each step."""
    x = (x * aug.brightness).clamp(0, 1)
    mean = _luma(x).mean()
    x = ((x - mean) * aug.contrast + mean).clamp(0, 1)
    grey = _luma(x)
    return ((x - grey) * aug.saturation + grey).clamp(0, 1)


class ImageProcessor:
    """Decode and preprocess images to [3, S, S] normalised tensors (S = ``prep.size``)."""

    def __init__(self, prep: ImagePrep) -> None:
        self.prep = prep
        self._mean = torch.tensor(prep.mean).view(3, 1, 1)
        self._std = torch.tensor(prep.std).view(3, 1, 1)

    def load(self, src: Source) -> Image.Image:
        """Decode an image file (path or bytes) to RGB, alpha composited on ``prep.background``."""
        try:
            img = Image.open(as_file(src))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # PIL reports truncated data as OSError
            raise ValueError(f"cannot decode image {describe(src)}: {exc}") from exc
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*self.prep.background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")

    def draw(self, width: int, height: int, generator: torch.Generator | None = None) -> Augmentation:
        """Random train-time augmentation parameters for an image of this size."""
        box = random_crop_box(width, height, self.prep.crop_scale, generator)
        s = self.prep.color_jitter
        factors = [_uniform(max(0.0, 1 - s), 1 + s, generator) for _ in range(3)]
        return Augmentation(box, *factors)

    def apply(self, img: Image.Image | np.ndarray, aug: Augmentation | None = None) -> torch.Tensor:
        """Crop+resize (bicubic) to S x S, jitter if ``aug`` is given, normalise: -> FloatTensor[3,S,S]."""
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        box = aug.box if aug is not None else centre_square(*img.size)
        size = self.prep.size
        resized = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if aug is not None:
            x = jitter(x, aug)
        return (x - self._mean) / self._std

    def __call__(
        self, img: Image.Image | np.ndarray, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Preprocess an RGB image (PIL or uint8 [H,W,3]); augmented only when ``train`` and ``prep.augment``."""
        aug = None
        if train and self.prep.augment:
            width, height = img.size if isinstance(img, Image.Image) else (img.shape[1], img.shape[0])
            aug = self.draw(width, height, generator)
        return self.apply(img, aug)
