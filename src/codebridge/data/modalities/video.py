"""Video preprocessing: decode every frame with PyAV, sample T frames uniformly, preprocess them like images.

At train time one augmentation (crop box, jitter) is drawn per clip and applied to every frame, so motion
between frames stays real motion rather than crop noise. As for images, the loader delivers uint8 frames and the
clip's jitter factors; ``on_device`` finishes them on the model's device (image.py says where the work is split).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import torch
from PIL import Image

from codebridge.config import num
from codebridge.data.modalities.base import Entry, Modality, encoder_name, register_modality
from codebridge.data.modalities.image import ImagePrep, ImageProcessor, finish_entry, finish_item, with_jitter
from codebridge.data.modalities.source import DecodeError, Source, as_file, decoding

if TYPE_CHECKING:
    from codebridge.config import Config, PrepConfig
    from codebridge.data.modalities.text import Tokenizer


@dataclass
class VideoPrep:
    """``prep.video``; each frame is preprocessed like an image (``prep.image``) at ``size``, normalised with
    ``mean``/``std`` when set (a pretrained frame tower's own, hf-video), else with ``prep.image``'s."""

    frames: int = num(8, ge=1)  # T frames sampled uniformly over the clip
    size: int = num(32, ge=1)
    mean: tuple[float, float, float] | None = num(None, ge=0, le=1)
    std: tuple[float, float, float] | None = num(None, gt=0)


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices: the centres of ``count`` equal segments, or all frames then the last repeated."""
    if total >= count:
        return [int((i + 0.5) * total / count) for i in range(count)]
    return list(range(total)) + [total - 1] * (count - total)


def expected_frames(container: av.container.InputContainer) -> int | None:
    """The frame count the header promises: the stream's, else (a video-only file) duration times frame rate."""
    stream = container.streams.video[0]
    if stream.frames:
        return stream.frames
    if len(container.streams) == 1 and container.duration and stream.average_rate:
        return round(container.duration / av.time_base * stream.average_rate)
    return None


def check_complete(decoded: int, expected: int | None) -> None:
    """A truncated clip decodes to fewer frames without any error from FFmpeg: compare with the header (10% and one
    frame of slack for rounding and variable frame rates)."""
    if expected is not None and expected - decoded > max(1.0, 0.1 * expected):
        raise DecodeError(f"is truncated or corrupt: decoded {decoded} of the {expected} frames its header promises")


def frame_prep(prep: VideoPrep, image: ImagePrep) -> ImagePrep:
    """How frames are cropped and normalised: ``prep.image`` at the clip size, with the video's own mean/std when
    set (a pretrained frame tower's)."""
    own = {key: value for key in ("mean", "std") if (value := getattr(prep, key)) is not None}
    return dataclasses.replace(image, size=prep.size, **own)


class VideoProcessor:
    """Decode clips to uint8 [T_all,H,W,3], sample and crop them to uint8 [T,3,S,S] (T = ``prep.frames``,
    S = ``prep.size``)."""

    def __init__(self, prep: VideoPrep, image: ImagePrep) -> None:
        self.prep = prep
        self.image = ImageProcessor(frame_prep(prep, image))

    def load(self, src: Source) -> np.ndarray:
        """Every frame of the first video stream as RGB uint8 [T_all,H,W,3]; any failure, and a frame larger than
        ``PIL.Image.MAX_IMAGE_PIXELS`` (checked from the header), is a ``DecodeError``."""
        with decoding("video", src), av.open(as_file(src)) as container:
            if not container.streams.video:
                raise DecodeError("has no video stream")
            stream = container.streams.video[0]
            width, height, limit = stream.codec_context.width, stream.codec_context.height, Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise DecodeError(f"claims {width}x{height} pixels per frame, more than the limit {limit}")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if not frames:
                raise DecodeError("has no frames")
            check_complete(len(frames), expected_frames(container))
            return np.stack(frames)

    def __call__(self, frames: np.ndarray, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """One clip through both halves, on the CPU: -> FloatTensor[T,3,S,S] as the encoder gets it."""
        return finish_item(self.entry(frames, train, generator), "frames", self.image.prep)

    def decode(self, src: Source) -> np.ndarray:
        return self.load(src)

    def from_user(self, item: Any) -> np.ndarray:
        """A path, bytes or RGB uint8 [T,H,W,3] frames."""
        return item if isinstance(item, np.ndarray) else self.load(item)

    def entry(self, raw: np.ndarray, train: bool, generator: torch.Generator | None = None) -> Entry:
        """The CPU half: uniformly sampled frames cropped to ``{"frames": uint8 [T,3,S,S]}`` with one augmentation
        for the whole clip, plus its ``"jitter"`` factors [3] when augmented."""
        aug = self.image.augmentation(raw.shape[2], raw.shape[1], train, generator)
        picked = uniform_indices(len(raw), self.prep.frames)
        return with_jitter({"frames": torch.stack([self.image.apply(raw[i], aug) for i in picked])}, aug)


@register_modality
class VideoModality(Modality):
    """Clips: ``{"frames": uint8 [B,T,3,S,S], "jitter": [B,3] (train)}`` from the loader, ``{"frames": float
    [B,T,3,S,S]}`` after ``on_device``, for a per-frame ViT + temporal layers (models/encoders/video.py)."""

    name = "video"
    extensions = ("mp4", "avi", "webm", "mkv", "mov")
    prep = VideoPrep
    encoder = "video"
    stream = 3  # the seed stream it always had

    def processor(self, prep: PrepConfig, tokenizer: Tokenizer | None) -> VideoProcessor:
        return VideoProcessor(prep.video, prep.image)

    def on_device(self, entry: Entry, prep: PrepConfig) -> Entry:
        return finish_entry(entry, "frames", frame_prep(prep.video, prep.image))

    def thumbnail(self, raw: np.ndarray) -> Image.Image:
        """The middle frame."""
        return Image.fromarray(raw[len(raw) // 2])

    def describe(self, cfg: Config) -> str:
        if encoder_name(cfg, self.name) != self.encoder:  # a pretrained tower describes itself
            return super().describe(cfg)
        return f"per-frame ViT + {cfg.model.video.temporal_depth} temporal layer(s), {cfg.prep.video.frames} frames"

    def rules(self, cfg: Config) -> dict[str, bool]:
        if encoder_name(cfg, self.name) != self.encoder:  # a pretrained frame tower fixes its own input size
            return {}
        return {
            "{prep.video.size} must be a multiple of {model.image.patch_size}": (
                cfg.prep.video.size % cfg.model.image.patch_size == 0
            ),
            "{model.video.heads} must divide {model.image.width}": cfg.model.image.width % cfg.model.video.heads == 0,
        }
