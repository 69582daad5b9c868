"""Video: decoding a real MP4 written with PyAV, uniform frame sampling, one augmentation per clip."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from codebridge.data.modalities.image import ImagePrep
from codebridge.data.modalities.video import VideoPrep, VideoProcessor, uniform_indices

PLAIN = ImagePrep(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels stay in [0, 1]


def grey_levels(count: int) -> list[int]:
    return [20 + 20 * k for k in range(count)]


def write_frames(path: Path, frames: list[np.ndarray]) -> None:
    """An H.264 MP4 (10 fps, near lossless) of RGB uint8 [H,W,3] frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "10", "threads": "1"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def write_mp4(path: Path, count: int, size: int = 32) -> None:
    """``count`` flat grey frames, frame k at level 20 + 20k, so each decoded frame tells its index."""
    write_frames(path, [np.full((size, size, 3), level, dtype=np.uint8) for level in grey_levels(count)])


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_mp4(path, 10)
    return path


def test_load_decodes_every_frame(mp4: Path) -> None:
    proc = VideoProcessor(VideoPrep(), PLAIN)
    for src in (str(mp4), mp4.read_bytes()):
        frames = proc.load(src)
        assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
        np.testing.assert_allclose(frames.reshape(10, -1).mean(1), grey_levels(10), atol=3)


def test_uniform_indices() -> None:
    assert uniform_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_indices(8, 8) == list(range(8))
    assert uniform_indices(3, 5) == [0, 1, 2, 2, 2]


@pytest.mark.parametrize(("count", "expected"), [(4, [1, 3, 6, 8]), (12, [*range(10), 9, 9])])
def test_frames_are_sampled_uniformly_or_padded_with_the_last(mp4: Path, count: int, expected: list[int]) -> None:
    proc = VideoProcessor(VideoPrep(frames=count, size=16), PLAIN)
    x = proc(proc.load(str(mp4)), train=False)
    assert x.shape == (count, 3, 16, 16) and x.dtype == torch.float32
    levels = np.array(grey_levels(10))[expected] / 255
    np.testing.assert_allclose(x.mean(dim=(1, 2, 3)).numpy(), levels, atol=3 / 255)


def test_train_augmentation_is_the_same_for_every_frame_and_reproducible() -> None:
    rng = np.random.default_rng(0)
    still = rng.integers(0, 256, size=(1, 24, 24, 3), dtype=np.uint8).repeat(6, axis=0)  # a clip of one image
    proc = VideoProcessor(VideoPrep(frames=4, size=16), ImagePrep(size=64))
    x = proc(still, train=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 16, 16)  # prep.video.size wins over prep.image.size
    assert all(torch.equal(x[0], frame) for frame in x[1:])
    assert torch.equal(x, proc(still, train=True, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(x, proc(still, train=True, generator=torch.Generator().manual_seed(1)), atol=1e-3)
    assert not torch.allclose(x, proc(still, train=False), atol=1e-3)


@pytest.mark.parametrize("content", [b"\x00\x00\x00\x18ftypmp42 garbage" * 4, None])
def test_load_rejects_bad_files_with_the_reason(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"does not exist|cannot decode video|no frames"):
        VideoProcessor(VideoPrep(), PLAIN).load(str(path))


def test_frames_larger_than_the_pixel_limit_are_refused_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image pixel limit (PIL.Image.MAX_IMAGE_PIXELS) holds per frame, checked before any frame is decoded."""
    from PIL import Image

    write_mp4(tmp_path / "clip.mp4", 3, size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"clip\.mp4: claims 32x32 pixels per frame, more than the limit 1000"):
        VideoProcessor(VideoPrep(), PLAIN).load(str(tmp_path / "clip.mp4"))
