"""Image preprocessing in PIL/numpy/torch: decode, composite alpha, crop+resize, colour jitter, normalise.

Decoding takes every mode PIL opens to 8-bit RGB (``to_rgb``): 16-bit grey keeps its high byte (as PIL does for
16-bit colour PNGs), floats in [0, 1] or [0, 255] are scaled, CIELAB goes through littlecms, alpha is composited on
``prep.background``; anything that cannot be mapped, and any image larger than ``PIL.Image.MAX_IMAGE_PIXELS``
(checked from the header, before decoding), is a ``DecodeError``.

Train-time augmentation is a random resized crop and colour jitter; never a horizontal flip, because emoji
(and the text in many images) are not mirror-symmetric. The augmentation is drawn once as an ``Augmentation``
and applied by ``apply``, so a video can use the same parameters for all of its frames.

The work is split where the bytes are smallest (docs/performance.md, "GPU input pipeline"): per item on the CPU
(in DataLoader workers) decode, crop and resize to uint8 [3,S,S], the only rounding (PIL's resize writes 8-bit
pixels, as it always did); then per batch on the model's device (``normalise``, the modality's ``on_device``)
to float, /255, colour jitter with each item's factors (``"jitter"`` [B,3] in the batch entry), mean/std.
Float pixels reaching ``normalise`` are taken as already normalised (a user's or OpenCLIP's preprocessed tensor).
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from codebridge.config import broken, num
from codebridge.data.modalities.base import Entry, Modality, encoder_name, register_modality
from codebridge.data.modalities.source import DecodeError, Source, as_file, decoding

if TYPE_CHECKING:
    from codebridge.config import Config, PrepConfig
    from codebridge.data.modalities.text import Tokenizer

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's "L" conversion
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey (a 32-bit "I" must hold 16-bit values)
BIT_DEPTH_FIX = "save it with 8 or 16 bits per channel"
_UNCHECKED_OPEN = threading.Lock()  # guards the brief lift of PIL's global pixel limit in ``_header_size``


@dataclass
class ImagePrep:
    """``prep.image``; video frames use it too, at ``prep.video.size``."""

    size: int = num(32, ge=1)
    mean: tuple[float, float, float] = num((0.5, 0.5, 0.5), ge=0, le=1)
    std: tuple[float, float, float] = num((0.5, 0.5, 0.5), gt=0)
    background: tuple[int, int, int] = num((255, 255, 255), ge=0, le=255)  # alpha is composited on this colour
    augment: bool = True  # train-time only: random resized crop, flip off (emoji are not mirror-symmetric), jitter
    crop_scale: tuple[float, float] = num((0.7, 1.0), gt=0, le=1)  # (min, max) area fraction of the random crop
    color_jitter: float = num(0.2, ge=0)

    def check(self) -> list[str]:
        return broken({"{crop_scale} must be (min, max) with min <= max": self.crop_scale[0] <= self.crop_scale[1]})


def _header_size(file: str | io.BytesIO) -> tuple[int, int]:
    """Width and height from the header of an image PIL refused to open as a decompression bomb."""
    if isinstance(file, io.BytesIO):
        file.seek(0)
    with _UNCHECKED_OPEN:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(file) as img:
                return img.size
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def open_checked(src: Source) -> Image.Image:
    """Open (header only) and refuse an image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` before any
    decoding: a 100-byte PNG may claim 20000x20000 pixels (a decompression bomb)."""
    file = as_file(src)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(file)
        size = img.size
    except Image.DecompressionBombError:
        size = _header_size(file)
    except UnidentifiedImageError:  # PIL's message names a BytesIO object: say what it means instead
        raise DecodeError("not an image format PIL can read, or its header is damaged") from None
    if limit is not None and size[0] * size[1] > limit:
        raise DecodeError(
            f"claims {size[0]}x{size[1]} pixels, more than the limit {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb or a corrupt header)"
        )
    return img


@lru_cache(maxsize=1)
def _lab_to_srgb() -> object:
    from PIL import ImageCms

    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit integer or float grey -> 8-bit "L" (or "LA" when a transparent value is set)."""
    values = np.asarray(img).astype(np.float64 if img.mode == "F" else np.int64)
    if not np.isfinite(values).all():
        raise DecodeError(f"{img.mode} image holds NaN or infinite pixels; {BIT_DEPTH_FIX}")
    low, high = values.min(), values.max()
    if img.mode == "F":
        if low < 0 or high > 255:
            raise DecodeError(f"float pixels span {low:g}..{high:g}, outside 0..1 and 0..255; {BIT_DEPTH_FIX}")
        grey = np.round(values * (255.0 if high <= 1.0 else 1.0)).astype(np.uint8)
    else:
        if low < 0 or high > 65535:
            raise DecodeError(f"{img.mode} pixels span {low}..{high}, outside the 16-bit range; {BIT_DEPTH_FIX}")
        grey = (values >> 8).astype(np.uint8)  # the high byte: what PIL keeps of 16-bit colour PNGs
    transparent = img.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey, "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, alpha (or a transparent colour) composited on ``background``."""
    if img.mode in INTEGER_MODES or img.mode == "F":
        img = _grey_to_8bit(img)
    elif img.mode == "LAB":  # PIL's convert("RGB") would copy the L, a, b bytes as R, G, B
        from PIL import ImageCms

        img = ImageCms.applyTransform(img, _lab_to_srgb())
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


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


@lru_cache(maxsize=16)
def _constants(*values: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each triple of ``values`` as a float32 [3,1,1] on ``device``, made once: a copy per batch would be a host
    sync on a GPU."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in values)


def _luma(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[...,3,H,W] -> [...,1,H,W] grey level (a weighted sum, not a matmul, so autocast leaves it in fp32)."""
    return (x * weights).sum(-3, keepdim=True)


def jitter(x: torch.Tensor, factors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation on [B,...,3,H,W] in [0, 1] with item b's ``factors[b]`` (3 of them, 1.0 =
    unchanged), clamped after each step; the contrast pivot is each picture's (each frame's) mean grey."""
    b, c, s = (f.view(-1, *[1] * (x.dim() - 1)) for f in factors.to(x.dtype).unbind(-1))
    x = (x * b).clamp(0, 1)
    mean = _luma(x, weights).mean(dim=(-3, -2, -1), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    grey = _luma(x, weights)
    return ((x - grey) * s + grey).clamp(0, 1)


def normalise(pixels: torch.Tensor, factors: torch.Tensor | None, prep: ImagePrep) -> torch.Tensor:
    """The device half of preprocessing, for a whole batch where it lies: uint8 [B,...,3,S,S] -> float /255, colour
    jitter by ``factors`` [B,3] (None: eval, no jitter), (x - mean) / std. Float pixels are returned unchanged:
    they are already normalised, so applying this twice cannot normalise twice."""
    if pixels.dtype != torch.uint8:
        return pixels
    weights, mean, std = _constants(LUMA, tuple(prep.mean), tuple(prep.std), device=pixels.device)
    x = pixels.float() / 255.0  # the same float32 values as the old per-item path: uint8 / 255 is exact per value
    if factors is not None:
        x = jitter(x, factors, weights)
    return (x - mean) / std


def finish_entry(entry: Entry, key: str, prep: ImagePrep) -> Entry:
    """A batch entry of uint8 pictures under ``key`` (+ ``"jitter"`` factors when augmented) -> model-ready
    ``{key: float}``: ``on_device`` of the image and video modalities."""
    return {key: normalise(entry[key], entry.get("jitter"), prep)}


def finish_item(entry: Entry, key: str, prep: ImagePrep) -> torch.Tensor:
    """One item's CPU-half entry finished here, as a batch of one: the float tensor its encoder gets."""
    return finish_entry({k: v[None] for k, v in entry.items()}, key, prep)[key][0]


class ImageProcessor:
    """Decode and preprocess images to uint8 [3, S, S] (S = ``prep.size``); ``normalise`` finishes them."""

    def __init__(self, prep: ImagePrep) -> None:
        self.prep = prep

    def load(self, src: Source) -> Image.Image:
        """Decode an image file (path or bytes) to 8-bit RGB (``to_rgb``); any failure is a ``DecodeError``."""
        with decoding("image", src), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged metadata, bomb warnings: the outcome is an image or an error
            img = open_checked(src)
            img.load()
            return to_rgb(img, self.prep.background)

    def draw(self, width: int, height: int, generator: torch.Generator | None = None) -> Augmentation:
        """Random train-time augmentation parameters for an image of this size."""
        box = random_crop_box(width, height, self.prep.crop_scale, generator)
        s = self.prep.color_jitter
        factors = [_uniform(max(0.0, 1 - s), 1 + s, generator) for _ in range(3)]
        return Augmentation(box, *factors)

    def apply(self, img: Image.Image | np.ndarray, aug: Augmentation | None = None) -> torch.Tensor:
        """Crop ``aug.box`` (the centre square without ``aug``) and resize (bicubic) to uint8 [3,S,S]."""
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        box = aug.box if aug is not None else centre_square(*img.size)
        size = self.prep.size
        resized = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def augmentation(
        self, width: int, height: int, train: bool, generator: torch.Generator | None
    ) -> Augmentation | None:
        """A draw when ``train`` and ``prep.augment``, else None (eval: centre square, no jitter)."""
        return self.draw(width, height, generator) if train and self.prep.augment else None

    def __call__(
        self, img: Image.Image | np.ndarray, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One RGB image (PIL or uint8 [H,W,3]) through both halves, on the CPU: -> FloatTensor[3,S,S] as the
        encoder gets it; augmented only when ``train`` and ``prep.augment``."""
        return finish_item(self.entry(img, train, generator), "pixels", self.prep)

    def decode(self, src: Source) -> np.ndarray:
        """``load`` as a uint8 [H,W,3] array: compact and picklable (the dataset caches and ships it)."""
        return np.asarray(self.load(src))

    def from_user(self, item: Any) -> Image.Image | np.ndarray:
        """A path, bytes, PIL image or uint8 [H,W,3] array; PIL images with alpha go through the file decoder so
        they are composited like files."""
        if isinstance(item, np.ndarray) or (isinstance(item, Image.Image) and item.mode == "RGB"):
            return item
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            item = buffer.getvalue()
        return self.load(item)

    def entry(self, raw: Image.Image | np.ndarray, train: bool, generator: torch.Generator | None = None) -> Entry:
        """The CPU half: ``{"pixels": uint8 [3,S,S]}``, plus ``"jitter"`` [3] (the draw's factors) when augmented."""
        width, height = raw.size if isinstance(raw, Image.Image) else (raw.shape[1], raw.shape[0])
        aug = self.augmentation(width, height, train, generator)
        return with_jitter({"pixels": self.apply(raw, aug)}, aug)


def with_jitter(entry: Entry, aug: Augmentation | None) -> Entry:
    """``entry`` plus the draw's jitter factors [3] (brightness, contrast, saturation) when there is a draw."""
    if aug is not None:
        entry["jitter"] = torch.tensor([aug.brightness, aug.contrast, aug.saturation], dtype=torch.float32)
    return entry


@register_modality
class ImageModality(Modality):
    """Still images: ``{"pixels": uint8 [B,3,S,S], "jitter": [B,3] (train)}`` from the loader, ``{"pixels": float
    [B,3,S,S]}`` after ``on_device``, for a ViT (models/encoders/image.py)."""

    name = "image"
    extensions = ("jpg", "jpeg", "png", "webp")
    prep = ImagePrep
    encoder = "image"
    stream = 0  # the seed stream it always had

    def processor(self, prep: PrepConfig, tokenizer: Tokenizer | None) -> ImageProcessor:
        return ImageProcessor(prep.image)

    def on_device(self, entry: Entry, prep: PrepConfig) -> Entry:
        return finish_entry(entry, "pixels", prep.image)

    def thumbnail(self, raw: np.ndarray) -> Image.Image:
        return Image.fromarray(raw)

    def describe(self, cfg: Config) -> str:
        if encoder_name(cfg, self.name) != self.encoder:  # a pretrained tower describes itself
            return super().describe(cfg)
        enc = cfg.model.image
        return f"ViT width {enc.width}, depth {enc.depth}, patch {enc.patch_size}, input {cfg.prep.image.size}px"

    def rules(self, cfg: Config) -> dict[str, bool]:
        if encoder_name(cfg, self.name) != self.encoder:  # a pretrained tower fixes its own input size
            return {}
        tiles = cfg.prep.image.size % cfg.model.image.patch_size == 0
        return {"{prep.image.size} must be a multiple of {model.image.patch_size}": tiles}
