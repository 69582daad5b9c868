"""Fault injection by class, not by instance: for every modality and every reader, files that are truncated at
several points, empty, of the wrong type, in the wrong text encoding, or of extreme size or sample format.

``codebridge data check`` must name every bad file and exit non-zero without a traceback; a file it passes must
decode exactly like the intact original (a damaged file never turns into silently different data).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from codebridge.cli import main
from codebridge.config import Config
from codebridge.data.preprocess import Preprocessors
from codebridge.data.sources.webdataset import member_extensions
from test_preprocess_image import bomb_png
from test_sources import write_tar

MEDIA = ("image", "audio", "video")  # the built-in media modalities, one table column each
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "bmp": "BMP", "webp": "WEBP", "tiff": "TIFF"}
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
VIDEO_FORMATS = {"mp4": "mp4", "avi": "avi", "mkv": "matroska"}
TRUNCATION_POINTS = (1 / 64, 1 / 4, 1 / 2, 3 / 4, 0.99)  # of the file length
SHARD_CUTS = TRUNCATION_POINTS[:-1]  # the last 1% of a tar is end-of-archive padding: losing it loses no data


@dataclass(frozen=True)
class Case:
    """One generated media file. ``original``: the intact bytes a damaged file must decode like, if it decodes."""

    name: str  # file name: unique, its extension is what a reader goes by
    kind: str  # the class: truncated, empty, wrong type, extreme
    modality: str
    data: bytes
    original: bytes | None = None  # None: the file must be reported

    @property
    def must_fail(self) -> bool:
        return self.original is None


def image_bytes(ext: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format=IMAGE_FORMATS[ext])
    return buf.getvalue()


def audio_bytes(ext: str, rate: int = 16000) -> bytes:
    fmt, subtype = AUDIO_FORMATS[ext]
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.arange(800, dtype=np.float32) / 5), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def video_bytes(ext: str, frames: int = 6) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=VIDEO_FORMATS[ext]) as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.full((16, 16, 3), 40 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def extreme_images() -> list[Case]:
    """Sample formats with no faithful 8-bit view, and headers that claim giant sizes."""
    cases = [
        Case("bomb-20000.png", "extreme", "image", bomb_png()),
        Case("bomb-10000.png", "extreme", "image", bomb_png(10000, 10000)),
    ]
    for name, mode, values in (("int32-70000.tiff", "I", [0, 70000]), ("float-nan.tiff", "F", [float("nan"), 0.5])):
        img = Image.new(mode, (2, 1))
        img.putdata(values)
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
        cases.append(Case(name, "extreme", "image", buf.getvalue()))
    return cases


def corpus() -> list[Case]:
    """Every class for every format: a few dozen tiny files, built in well under a second."""
    makers: dict[str, tuple[Callable[[str], bytes], dict]] = {
        "image": (image_bytes, IMAGE_FORMATS),
        "audio": (audio_bytes, AUDIO_FORMATS),
        "video": (video_bytes, VIDEO_FORMATS),
    }
    cases: list[Case] = []
    for modality, (make, formats) in makers.items():
        for ext in formats:
            whole = make(ext)
            for point in TRUNCATION_POINTS:
                cut = max(1, int(point * len(whole)))
                cases.append(Case(f"cut-{cut}-of-{len(whole)}.{ext}", "truncated", modality, whole[:cut], whole))
            cases.append(Case(f"empty.{ext}", "empty", modality, b""))
            cases.append(Case(f"text-named.{ext}", "wrong type", modality, b"this is not a media file\n"))
    cases += [
        Case("png-named.wav", "wrong type", "audio", image_bytes("png")),
        Case("wav-named.png", "wrong type", "image", audio_bytes("wav")),
        Case("wav-named.mp4", "wrong type", "video", audio_bytes("wav")),
        Case("rate-1hz.wav", "extreme", "audio", audio_bytes("wav", rate=1)),
        Case("rate-44101hz.wav", "extreme", "audio", audio_bytes("wav", rate=44101)),
        Case("no-frames.mp4", "extreme", "video", video_bytes("mp4", frames=0)),
        *extreme_images(),
    ]
    return cases


CASES = corpus()


def decodes_like(case: Case, prep: Preprocessors) -> bool:
    load = prep[case.modality].load
    got, want = load(case.data), load(case.original)
    return np.array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def media_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All cases as one CSV, one row each (media column by modality), plus one good row."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "files").mkdir()
    (folder / "files/good.png").write_bytes(image_bytes("png"))
    lines = ["filepath,title,audio,video", "files/good.png,a good image,,"]
    for case in CASES:
        (folder / "files" / case.name).write_bytes(case.data)
        cells = {m: f"files/{case.name}" if m == case.modality else "" for m in MEDIA}
        lines.append(f"{cells['image']},{case.kind} {case.name},{cells['audio']},{cells['video']}")
    path = folder / "corpus.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def check(spec: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["data", "check", str(spec)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_corpus_covers_every_class_and_modality() -> None:
    classes = Counter((case.kind, case.modality) for case in CASES)
    for modality in MEDIA:
        assert {kind for kind, m in classes if m == modality} >= {"truncated", "empty", "wrong type", "extreme"}
    assert Counter(case.kind for case in CASES) == {"truncated": 60, "empty": 12, "wrong type": 15, "extreme": 7}


def test_data_check_names_every_bad_media_file(media_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(media_csv, capsys)
    assert code == 1 and "Traceback" not in out + err
    lines = [line for line in out.splitlines() if line.strip()]
    rows = {line.split()[0]: line for line in lines if line.split()[0][-1].isdigit()}
    prep = Preprocessors(Config().prep)
    for line_number, case in enumerate(CASES, start=3):
        row = rows.get(f"{media_csv}:{line_number}")
        if row is None:  # passed: must be an intact-looking damaged file that decodes exactly like the original
            assert not case.must_fail, f"{case.name} ({case.kind}) was not reported"
            assert decodes_like(case, prep), f"{case.name} decodes to different data and was not reported"
        else:
            assert case.name in row  # the file is named in the reason
    reported = len(rows)
    assert reported >= sum(case.must_fail for case in CASES) and f"{reported} bad" in out


def test_shards_report_every_bad_member_and_damaged_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    members = [("good.png", image_bytes("png")), ("good.txt", b"fine")]
    stored = {
        i: case for i, case in enumerate(CASES) if case.name.rsplit(".", 1)[1] in member_extensions()
    }  # not .gif...
    for i, case in stored.items():
        members += [(f"{i:03d}.{case.name.rsplit('.', 1)[1]}", case.data), (f"{i:03d}.txt", case.name.encode())]
    members += [("latin.png", image_bytes("png")), ("latin.txt", "caf\xe9".encode("latin-1"))]
    whole = write_tar(shards / "shard-00000.tar", members).read_bytes()
    for point in SHARD_CUTS:
        (shards / f"shard-cut-{point:.3f}.tar").write_bytes(whole[: int(point * len(whole))])
    (shards / "shard-empty.tar").write_bytes(b"")
    (shards / "shard-text.tar").write_text("not a tar\n")
    code, out, err = check(shards, capsys)
    assert code == 1 and "Traceback" not in out + err
    prep = Preprocessors(Config().prep)
    assert len(stored) > 50
    for i, case in stored.items():
        named = f"shard-00000.tar:{i:03d} " in out
        assert named or (not case.must_fail and decodes_like(case, prep)), (case.name, out)
    assert "shard-00000.tar:latin " in out and "not UTF-8 at line 1, byte 3 (0xe9)" in out
    damaged = ["empty", "text", *(f"cut-{p:.3f}" for p in SHARD_CUTS)]
    assert [name for name in damaged if f"shard-{name}.tar " not in out] == [], out


TEXT_CASES = {  # file name -> (content, exit code, what the one-line error or report must say)
    "empty.csv": (b"", 2, "empty file; expected a header row"),
    "header-only.csv": (b"filepath,title\n", 1, "no samples"),
    "empty.jsonl": (b"", 1, "no samples"),
    "blank-lines.jsonl": (b"\n\n", 1, "no samples"),
    "latin1.csv": (
        "filepath,title\ngood.png,caf\xe9\n".encode("latin-1"),
        2,
        "latin1.csv:2: byte 27 (0xe9) is not UTF-8",
    ),
    "latin1.tsv": (
        "filepath\ttitle\ngood.png\tna\xefve\n".encode("latin-1"),
        2,
        "latin1.tsv:2: byte 26 (0xef) is not UTF-8",
    ),
    "latin1.jsonl": (
        '{"image": "good.png", "text": "ok"}\n{"image": "good.png", "text": "\xe9"}\n'.encode("latin-1"),
        2,
        "latin1.jsonl:2: byte 67 (0xe9)",
    ),
    "png-named.csv": (image_bytes("png"), 2, "png-named.csv:1: byte 0 (0x89) is not UTF-8"),
    "cut-row.jsonl": (b'{"image": "good.png", "text": "ok"}\n{"image": "good.p', 1, "not valid JSON"),
    "unclosed-quote.csv": (b'filepath,title\ngood.png,"never closed\n' + b"x" * 140000, 2, "unclosed-quote.csv:"),
}


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_text_readers_give_one_line_errors(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, exit_code, message = TEXT_CASES[name]
    (tmp_path / "good.png").write_bytes(image_bytes("png"))
    (tmp_path / name).write_bytes(content)
    code, out, err = check(tmp_path / name, capsys)
    assert code == exit_code and message in out + err and "Traceback" not in out + err
    if exit_code == 2:
        assert err.count("\n") == 1 and err.startswith("error: ")
    if "UTF-8" in message:
        assert "iconv -f latin1 -t utf-8" in err


def test_empty_and_missing_shard_sets_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "none").mkdir()
    code, _, err = check(tmp_path / "none", capsys)
    assert code == 2 and "holds no .tar shards" in err
    code, _, err = check(f"{tmp_path}/shard-{{00000..00002}}.tar", capsys)
    assert code == 2 and "3 of 3 shard(s)" in err
    with tarfile.open(tmp_path / "hollow.tar", "w"):
        pass
    code, out, _ = check(tmp_path / "hollow.tar", capsys)
    assert code == 1 and "no samples" in out


def test_the_real_cli_on_the_whole_corpus_prints_no_traceback(media_csv: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "codebridge", "data", "check", str(media_csv)], capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "Warning" not in done.stderr
