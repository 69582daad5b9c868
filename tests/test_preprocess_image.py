"""Image preprocessing: decoding, alpha compositing, shape/normalisation, eval determinism, train augmentation."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codebridge.data.modalities.image import ImagePrep, ImageProcessor, to_rgb
from codebridge.data.modalities.source import decoding
from codebridge.data.sample import BadSampleError


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
    with pytest.raises(ValueError, match=r"does not exist|cannot decode|not an image format|empty"):
        ImageProcessor(ImagePrep()).load(str(path))


# ---------------------------------------------------------------------------------------------------------------
# every PIL mode -> the right 8-bit RGB, or a named error
# ---------------------------------------------------------------------------------------------------------------
WHITE = (255, 255, 255)


def srgb_grey(lab_l: int) -> int:
    """sRGB level of the neutral CIELAB colour with PIL's 8-bit L (L* = L / 2.55): CIE L* -> Y -> sRGB gamma."""
    lightness = lab_l / 2.55
    y = ((lightness + 16) / 116) ** 3 if lightness > 8 else lightness / 903.3
    v = 1.055 * y ** (1 / 2.4) - 0.055 if y > 0.0031308 else 12.92 * y
    return round(255 * v)


def over(rgb: tuple[int, ...], alpha: int, bg: tuple[int, int, int] = WHITE) -> tuple[int, ...]:
    return tuple(round((c * alpha + b * (255 - alpha)) / 255) for c, b in zip(rgb, bg, strict=True))


def hsv(h: int, s: int, v: int) -> tuple[int, ...]:
    import colorsys

    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h / 255, s / 255, v / 255))


def cmyk(c: int, m: int, y: int, k: int) -> tuple[int, ...]:
    """Naive CMYK (no colour profile): each channel (255 - ink) * (255 - black) / 255."""
    return tuple(round((255 - ink) * (255 - k) / 255) for ink in (c, m, y))


def ycbcr(y: int, cb: int, cr: int) -> tuple[int, ...]:
    """JPEG (full-range ITU-R 601) YCbCr -> RGB."""
    r, g, b = y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)
    return tuple(min(255, max(0, round(c))) for c in (r, g, b))


def palette(mode: str) -> Image.Image:
    img = Image.new(mode, (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1] if mode == "P" else [(0, 255), (1, 64)])
    return img


def with_info(img: Image.Image, **info: object) -> Image.Image:
    img.info.update(info)
    return img


def filled(mode: str, values: list) -> Image.Image:
    img = Image.new(mode, (len(values), 1))
    img.putdata(values)
    return img


# (mode or case name, image, expected RGB of each pixel, reference): every mode PIL opens or builds
MODE_CASES = [
    ("1", filled("1", [0, 255]), [(0, 0, 0), WHITE]),
    ("L", filled("L", [0, 77, 255]), [(0, 0, 0), (77,) * 3, WHITE]),
    ("L+transparency", with_info(filled("L", [0, 77]), transparency=0), [WHITE, (77,) * 3]),
    ("LA", filled("LA", [(77, 255), (77, 128), (0, 0)]), [(77,) * 3, over((77,) * 3, 128), WHITE]),
    ("La", filled("La", [(77, 255), (0, 0)]), None),  # premultiplied grey+alpha: PIL cannot convert it
    ("P", palette("P"), [(10, 20, 30), (200, 100, 50)]),
    ("P+transparency", with_info(palette("P"), transparency=1), [(10, 20, 30), WHITE]),
    ("PA", palette("PA"), [(10, 20, 30), over((200, 100, 50), 64)]),
    ("RGB", filled("RGB", [(1, 2, 3), (200, 100, 50)]), [(1, 2, 3), (200, 100, 50)]),
    ("RGB+transparency", with_info(filled("RGB", [(1, 2, 3), (9, 9, 9)]), transparency=(9, 9, 9)), [(1, 2, 3), WHITE]),
    ("RGBA", filled("RGBA", [(200, 100, 50, 255), (200, 100, 50, 100)]), [(200, 100, 50), over((200, 100, 50), 100)]),
    ("RGBa", filled("RGBa", [(100, 50, 0, 128)]), [over((199, 100, 0), 128)]),  # premultiplied
    ("RGBX", filled("RGBX", [(1, 2, 3, 0)]), [(1, 2, 3)]),
    ("CMYK", filled("CMYK", [(0, 255, 0, 0), (10, 20, 30, 40)]), [cmyk(0, 255, 0, 0), cmyk(10, 20, 30, 40)]),
    ("YCbCr", filled("YCbCr", [(100, 128, 128), (120, 90, 200)]), [(100,) * 3, ycbcr(120, 90, 200)]),
    (
        "HSV",
        filled("HSV", [(0, 255, 255), (85, 255, 128), (30, 100, 200)]),
        [hsv(0, 255, 255), hsv(85, 255, 128), hsv(30, 100, 200)],
    ),
    (
        "LAB",
        filled("LAB", [(128, 128, 128), (230, 128, 128), (0, 128, 128)]),
        [(srgb_grey(128),) * 3, (srgb_grey(230),) * 3, (0, 0, 0)],
    ),
    *(
        (mode, filled(mode, [0, 0x1234, 0xFFFF]), [(0, 0, 0), (0x12,) * 3, WHITE])
        for mode in ("I", "I;16", "I;16B", "I;16L", "I;16N")
    ),
    ("I+transparency", with_info(filled("I;16", [0x1234, 7]), transparency=7), [(0x12,) * 3, WHITE]),
    ("I out of range", filled("I", [0, 70000]), None),
    ("F in [0, 1]", filled("F", [0.0, 0.25, 1.0]), [(0, 0, 0), (64,) * 3, WHITE]),
    ("F in [0, 255]", filled("F", [0.0, 77.0, 255.0]), [(0, 0, 0), (77,) * 3, WHITE]),
    ("F negative", filled("F", [-1.0, 0.5]), None),
    ("F not finite", filled("F", [float("nan"), 0.5]), None),
]


def stored(img: Image.Image) -> bytes | None:
    """The image as PNG or TIFF bytes when one of them reopens in the same mode with the same info, else None."""
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt, **{k: v for k, v in img.info.items() if k == "transparency"})
        except (OSError, ValueError, KeyError, TypeError):
            continue
        back = Image.open(io.BytesIO(buf.getvalue()))
        if back.mode == img.mode and back.info.get("transparency") == img.info.get("transparency"):
            return buf.getvalue()
    return None


@pytest.mark.parametrize(("case", "img", "expected"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_decodes_to_the_reference_rgb_or_is_reported(case: str, img: Image.Image, expected: list) -> None:
    proc = ImageProcessor(ImagePrep())
    inputs = [img] + ([data] if (data := stored(img)) is not None else [])
    for value in inputs:
        if expected is None:
            with pytest.raises(BadSampleError, match=r"La to|range|NaN|outside 0\.\.1"):
                proc.load(value) if isinstance(value, bytes) else to_rgb_checked(value)
            continue
        rgb = proc.load(value) if isinstance(value, bytes) else to_rgb_checked(value)
        assert rgb.mode == "RGB"
        got = np.asarray(rgb)[0].astype(int)
        assert np.abs(got - np.array(expected)).max() <= 1, (case, got.tolist(), expected)


def to_rgb_checked(img: Image.Image) -> Image.Image:
    """``to_rgb`` through the same error wrapping as ``load``."""
    with decoding("image", b"in memory"):
        return to_rgb(img, WHITE)


def test_sixteen_bit_png_is_not_white() -> None:
    """Issue 16 item 3: a 16-bit grey PNG decoded as all 255."""
    img = Image.fromarray(np.array([[0x0100, 0x8000], [0xFF00, 0x2000]], dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    assert np.asarray(ImageProcessor(ImagePrep()).load(buf.getvalue()))[..., 0].tolist() == [[1, 128], [255, 32]]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG header claiming ``width`` x ``height`` grey pixels, with one tiny compressed row: about 70 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_a_named_bad_image_checked_before_decoding(recwarn: pytest.WarningsRecorder) -> None:
    proc = ImageProcessor(ImagePrep())
    limit = Image.MAX_IMAGE_PIXELS
    for width in (10000, 20000):  # over PIL's warning limit, and over its error limit
        with pytest.raises(
            BadSampleError, match=rf"<\d+ bytes>: claims {width}x{width} pixels, more than the limit {limit}"
        ):
            proc.load(bomb_png(width, width))
    assert limit == Image.MAX_IMAGE_PIXELS and not recwarn.list  # PIL's limit restored, no warning printed
