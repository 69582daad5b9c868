"""Video preprocessing: decode every frame with PyAV, sample T frames uniformly, preprocess them like images.

At train time one augmentation (crop box, jitter) is drawn per clip and applied to every frame, so motion
between frames stays real motion rather than crop noise.
"""

from __future__ import annotations

import dataclasses

import av
import numpy as np
import torch

from codebridge.config import ImagePrep, VideoPrep
from codebridge.data.preprocess.image import ImageProcessor
from codebridge.data.preprocess.source import Source, as_file, describe


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices: the centres of ``count`` equal segments, or all frames then the last repeated."""
    if total >= count:
        return [int((i + 0.5) * total / count) for i in range(count)]
    return list(range(total)) + [total - 1] * (count - total)


class VideoProcessor:
    """Decode clips to uint8 [T_all,H,W,3] and preprocess them to [T,3,S,S] (T = ``prep.frames``, S = ``prep.size``)."""

    def __init__(self, prep: VideoPrep, image: ImagePrep) -> None:
        self.prep = prep
        self.image = ImageProcessor(dataclasses.replace(image, size=prep.size))

    def load(self, src: Source) -> np.ndarray:
        """Every frame of the first video stream as RGB uint8 [T_all,H,W,3]."""
        try:
            with av.open(as_file(src)) as container:
                if not container.streams.video:
                    raise ValueError(f"{describe(src)} has no video stream")
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode video {describe(src)}: {exc}") from exc
        if not frames:
            raise ValueError(f"video {describe(src)} has no frames")
        return np.stack(frames)

    def __call__(self, frames: np.ndarray, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniformly sampled, preprocessed frames -> FloatTensor[T,3,S,S] (one augmentation for the whole clip)."""
        aug = None
        if train and self.image.prep.augment:
            aug = self.image.draw(frames.shape[2], frames.shape[1], generator)
        picked = uniform_indices(len(frames), self.prep.frames)
        return torch.stack([self.image.apply(frames[i], aug) for i in picked])
