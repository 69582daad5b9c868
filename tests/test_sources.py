"""Data sources: CSV/TSV, JSONL, WebDataset shards and built-in suites as ``Sample`` lists, and their bad input.

The helpers at the top make real media files and are shared with test_shard.py and test_check.py.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from codebridge.config import ConfigError, DataConfig
from codebridge.data.sample import BadSampleError
from codebridge.data.sources import open_source
from codebridge.data.sources.webdataset import MediaBytes


# ---------------------------------------------------------------------------------------------------------------
# real media files and small datasets
# ---------------------------------------------------------------------------------------------------------------
def make_image(path: Path, color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def make_audio(path: Path, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(1600, dtype=np.float32) / 16000
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), 16000)
    return path


def make_video(path: Path, frames: int = 4, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def truncate(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def write_table(path: Path, rows: list[list[str]], separator: str = ",") -> Path:
    path.write_text("\n".join(separator.join(row) for row in rows) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_media(folder: Path) -> Path:
    """``folder`` with images/{red,blue,green}.png, audio/{low,high}.wav and video/clip.mp4."""
    make_image(folder / "images/red.png", (255, 0, 0))
    make_image(folder / "images/blue.png", (0, 0, 255))
    make_image(folder / "images/green.png", (0, 255, 0))
    make_audio(folder / "audio/low.wav", 220.0)
    make_audio(folder / "audio/high.wav", 880.0)
    make_video(folder / "video/clip.mp4")
    return folder


@pytest.fixture
def media(tmp_path: Path) -> Path:
    return make_media(tmp_path)


COCO_ROWS = [
    ["filepath", "title", "label:group"],
    ["images/red.png", "a red square", "0"],
    ["images/red.png", "red", "0"],
    ["images/blue.png", "a blue square", "1"],
    ["images/red.png", "crimson block", "0"],
]


# ---------------------------------------------------------------------------------------------------------------
# CSV / TSV
# ---------------------------------------------------------------------------------------------------------------
def test_csv_groups_captions_of_the_same_media(media: Path) -> None:
    spec = str(write_table(media / "train.csv", COCO_ROWS))
    red, blue = open_source(spec, DataConfig())
    assert red.media.get("text", []) == ["a red square", "red", "crimson block"]
    assert blue.media.get("text", []) == ["a blue square"]
    assert (red.labels, blue.labels) == ({"group": 0}, {"group": 1})
    assert Path(red.media.get("image")).read_bytes() == (media / "images/red.png").read_bytes()
    assert red.source == f"{spec}:2" and blue.source == f"{spec}:4"
    assert red.key == "images/red.png" and red.media.get("audio") is None and red.media.get("video") is None


def test_specs_joined_by_double_colon_are_concatenated_in_order(media: Path) -> None:
    csv_spec = str(write_table(media / "train.csv", COCO_ROWS))
    jsonl_spec = str(write_jsonl(media / "more.jsonl", [{"image": "images/red.png", "text": "scarlet"}]))
    joined = open_source(f"{csv_spec}::{jsonl_spec}", DataConfig())
    assert [s.media.get("text", []) for s in joined] == [
        *(s.media.get("text", []) for s in open_source(csv_spec, DataConfig())),
        *(s.media.get("text", []) for s in open_source(jsonl_spec, DataConfig())),
    ]
    assert joined[-1].source == f"{jsonl_spec}:1"
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        open_source(f"{csv_spec}::{media / 'missing.csv'}", DataConfig())


def test_tsv_by_extension_and_separator_from_config(media: Path) -> None:
    rows = [r[:2] for r in COCO_ROWS]
    tsv = open_source(str(write_table(media / "data.tsv", rows, "\t")), DataConfig())
    semicolon = open_source(str(write_table(media / "data.csv", rows, ";")), DataConfig(csv_separator=";"))
    assert [s.media.get("text", []) for s in tsv] == [["a red square", "red", "crimson block"], ["a blue square"]]
    assert [s.media.get("text", []) for s in semicolon] == [s.media.get("text", []) for s in tsv]


def test_csv_separator_is_sniffed_from_the_header_when_not_set(media: Path) -> None:
    """OpenCLIP writes tab-separated .csv files by default; a comma in a caption must not fool the sniffer."""
    rows = [r[:2] for r in COCO_ROWS] + [["images/blue.png", "blue, again"]]
    tabbed = open_source(str(write_table(media / "openclip.csv", rows, "\t")), DataConfig())
    commas = open_source(str(write_table(media / "commas.csv", [[f'"{c}"' for c in r] for r in rows])), DataConfig())
    assert (
        [s.media.get("text", []) for s in tabbed]
        == [s.media.get("text", []) for s in commas]
        == [
            ["a red square", "red", "crimson block"],
            ["a blue square", "blue, again"],
        ]
    )
    with pytest.raises(ConfigError, match="one column only"):  # an explicit separator wins over sniffing
        open_source(str(media / "openclip.csv"), DataConfig(csv_separator=","))


def test_csv_audio_and_video_columns_and_custom_names(media: Path) -> None:
    rows = [
        ["img", "caption", "speech", "clip"],
        ["images/red.png", "red, spoken", "audio/low.wav", ""],
        ["", "a moving clip", "", "video/clip.mp4"],
    ]
    data = DataConfig(csv_image_key="img", csv_caption_key="caption", csv_audio_key="speech", csv_video_key="clip")
    spoken, clip = open_source(str(write_table(media / "av.csv", [*rows[:1], *(_quote(r) for r in rows[1:])])), data)
    assert spoken.has("image") and spoken.has("audio") and not spoken.has("video")
    assert spoken.media.get("text", []) == ["red, spoken"]
    assert clip.media.get("video") == str(media / "video/clip.mp4") and clip.media.get("image") is None


def _quote(row: list[str]) -> list[str]:
    return [f'"{cell}"' if "," in cell else cell for cell in row]


def test_csv_with_wrong_columns_lists_expected_and_found(media: Path) -> None:
    path = write_table(media / "wrong.csv", [["image", "caption"], ["images/red.png", "red"]])
    with pytest.raises(ConfigError) as info:
        open_source(str(path), DataConfig())
    message = str(info.value)
    assert str(path) in message and "'filepath'" in message and "'title'" in message
    assert "found 'image', 'caption'" in message and "--set data.csv_image_key=" in message


@pytest.mark.parametrize(
    ("row", "line", "expected"),
    [
        (["images/missing.png", "gone"], 3, "images/missing.png does not exist"),
        (["images/blue.png", "   "], 3, "empty caption"),
        (["images/blue.png", "blue", "extra"], 3, "expected 2 fields, found 3"),
        (["", "no media"], 3, "no media path"),
    ],
)
def test_csv_bad_rows_name_file_and_line(media: Path, row: list[str], line: int, expected: str) -> None:
    path = write_table(media / "bad.csv", [["filepath", "title"], ["images/red.png", "red"], row])
    with pytest.raises(BadSampleError) as info:
        open_source(str(path), DataConfig())
    assert info.value.source == f"{path}:{line}"
    assert expected in str(info.value) and "data.skip_bad=true" in str(info.value)


def test_skip_bad_skips_counts_and_logs(media: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [["filepath", "title"], ["images/red.png", "red"], ["images/nope.png", "x"], ["images/blue.png", ""]]
    path = write_table(media / "bad.csv", rows)
    with caplog.at_level(logging.WARNING):
        samples = open_source(str(path), DataConfig(skip_bad=True))
    assert [s.media.get("text", []) for s in samples] == [["red"]]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 2 bad sample(s)" in record.message
    assert "missing media file: 1" in record.message and "empty caption: 1" in record.message
    assert f"{path}:3" in record.message and f"{path}:4" in record.message


# ---------------------------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------------------------
def test_jsonl_fields(media: Path) -> None:
    rows = [
        {"image": "images/red.png", "text": ["red", " a red square "], "labels": {"group": 2}, "meta": {"n": 1}},
        {"key": "spoken", "audio": "audio/low.wav", "text": "low tone"},
        "",
        {"video": str(media / "video/clip.mp4")},
    ]
    spec = str(write_jsonl(media / "data.jsonl", rows))
    first, spoken, clip = open_source(spec, DataConfig())
    assert (
        first.media.get("text", []) == ["red", "a red square"]
        and first.labels == {"group": 2}
        and first.meta == {"n": 1}
    )
    assert (
        first.key == "data-1"
        and first.source == f"{spec}:1"
        and first.media.get("image") == str(media / "images/red.png")
    )
    assert (
        spoken.key == "spoken"
        and spoken.media.get("text", []) == ["low tone"]
        and spoken.media.get("audio") == str(media / "audio/low.wav")
    )
    assert (
        clip.source == f"{spec}:4"
        and clip.media.get("text", []) == []
        and clip.media.get("video") == str(media / "video/clip.mp4")
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"image": "images/red.png", "text": "red"', "not valid JSON"),
        ('{"image": "images/red.png", "caption": "red"}', "unknown key(s) caption"),
        ('{"image": "images/red.png", "text": ["red", ""]}', "empty caption"),
        ('{"image": "images/none.png", "text": "red"}', "images/none.png does not exist"),
        ('{"image": "images/red.png", "labels": {"group": "two"}}', "labels must map names to integers"),
        ('{"meta": {"a": 1}}', "no modality"),
    ],
)
def test_jsonl_bad_lines_name_file_and_line(media: Path, line: str, expected: str) -> None:
    path = write_jsonl(media / "bad.jsonl", [{"image": "images/red.png", "text": "ok"}, line])
    with pytest.raises(BadSampleError) as info:
        open_source(str(path), DataConfig())
    assert info.value.source == f"{path}:2" and expected in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------------------------
def user_shards(folder: Path, media: Path) -> list[Path]:
    """Two img2dataset-style shards: jpg-less png/txt/json members, one audio-only sample, an ignored member."""
    red, blue = (media / "images/red.png").read_bytes(), (media / "images/blue.png").read_bytes()
    folder.mkdir()
    first = write_tar(
        folder / "shard-00000.tar",
        [
            ("abc.png", red),
            ("abc.txt", b"a red square\nred\n"),
            ("abc.json", json.dumps({"url": "http://x/red.png", "labels": {"group": 0}}).encode()),
            ("abc.parquet", b"ignored"),
            ("def.wav", (media / "audio/low.wav").read_bytes()),
        ],
    )
    second = write_tar(folder / "shard-00001.tar", [("ghi.png", blue), ("ghi.txt", b"blue")])
    return [first, second]


def test_shards_group_members_by_key(media: Path) -> None:
    first, second = user_shards(media / "shards", media)
    abc, tone, ghi = open_source(str(media / "shards"), DataConfig())
    assert abc.key == "abc" and abc.source == f"{first}:abc" and ghi.source == f"{second}:ghi"
    assert abc.media.get("image") == (media / "images/red.png").read_bytes() and isinstance(
        abc.media.get("image"), MediaBytes
    )
    assert abc.media.get("image").ext == "png" and abc.media.get("text", []) == ["a red square", "red"]
    assert abc.labels == {"group": 0} and abc.meta == {"url": "http://x/red.png"}
    assert (
        tone.media.get("audio") == (media / "audio/low.wav").read_bytes()
        and tone.media.get("text", []) == []
        and tone.media.get("image") is None
    )
    brace = open_source(str(media / "shards/shard-{00000..00001}.tar"), DataConfig())
    assert brace == [abc, tone, ghi]
    assert open_source(str(second), DataConfig()) == [ghi]


def test_media_bytes_survive_pickling() -> None:
    media = pickle.loads(pickle.dumps(MediaBytes(b"\x89PNG", "png")))
    assert media == b"\x89PNG" and media.ext == "png"


@pytest.mark.parametrize("cut", [3000, 1024 * 3])  # inside a member; exactly at a member boundary
def test_truncated_shard_names_shard_and_last_good_key(media: Path, cut: int) -> None:
    members = [(f"{i:03d}.txt", f"caption {i}".encode()) for i in range(6)]
    path = truncate(write_tar(media / "shard-00000.tar", members), cut)
    with pytest.raises(BadSampleError) as info:
        open_source(str(path), DataConfig())
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message and "re-create" in message
    samples = open_source(str(path), DataConfig(skip_bad=True))
    assert samples and f"after key {samples[-1].key!r}" in message
    assert [s.media.get("text", []) for s in samples] == [[f"caption {i}"] for i in range(len(samples))]


def test_bad_shard_member_names_shard_and_key(media: Path) -> None:
    path = write_tar(media / "s.tar", [("ok.txt", b"fine"), ("bad.txt", b"  \n"), ("bad.png", b"x")])
    with pytest.raises(BadSampleError) as info:
        open_source(str(path), DataConfig())
    assert info.value.source == f"{path}:bad" and "empty caption" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# dispatch and built-in suites
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_spec_lists_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown data spec 'emoji-styles'.*emoji-style.*\.csv/\.tsv.*\.jsonl"):
        open_source("emoji-styles", DataConfig())
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        open_source(str(tmp_path / "missing.csv"), DataConfig())
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards"):
        open_source(str(tmp_path), DataConfig())
    with pytest.raises(FileNotFoundError, match=r"2 of 2 shard\(s\)"):
        open_source(str(tmp_path / "s-{0..1}.tar"), DataConfig())


def test_builtin_suite_is_delegated(emoji_root: Path) -> None:
    from codebridge.data.emoji.suites import load_suite

    samples = open_source("emoji-style:test", DataConfig(root=str(emoji_root)))
    assert samples and samples == load_suite("emoji-style", "test", emoji_root)
    assert open_source("emoji-clips", DataConfig(root=str(emoji_root))) == load_suite(
        "emoji-clips", "train", emoji_root
    )


def test_a_source_defined_here_is_found_by_its_spec(media: Path) -> None:
    """The protocol: a new reader registers itself and says which specs it handles; no central table changes."""
    from collections.abc import Iterator

    from codebridge.data.sample import Sample
    from codebridge.data.sources import SOURCES, Source, source_for

    class Counting(Source):
        accepts = "count:N"

        @classmethod
        def handles(cls, spec: str) -> bool:
            return spec.startswith("count:")

        def __iter__(self) -> Iterator[Sample]:
            for i in range(int(self.spec.partition(":")[2])):
                yield Sample(key=str(i), source=f"{self.spec}:{i}", media={"text": [f"caption {i}"]})

    SOURCES.register("test-counting")(Counting)
    try:
        assert [s.key for s in open_source("count:3", DataConfig())] == ["0", "1", "2"]
        joined = source_for(f"count:2::{write_table(media / 't.csv', COCO_ROWS)}", DataConfig())
        assert joined.length() is None and joined.shards() is None  # a part neither knows its length nor streams
        with pytest.raises(ConfigError, match=r"count:N"):
            open_source("nothing-here", DataConfig())
    finally:
        SOURCES._items.pop("test-counting")


def test_sources_know_length_shards_and_suite_metadata(media: Path) -> None:
    from codebridge.data.sources import source_for

    first, second = user_shards(media / "shards", media)
    shards = source_for(str(media / "shards"), DataConfig())
    assert shards.shards() == [str(first), str(second)] and shards.length() is None
    table = source_for(str(write_table(media / "t.csv", COCO_ROWS)), DataConfig())
    assert table.length() == 2 and table.shards() is None and table.class_names("group") is None
    assert table.split("train") is None and table.concept_groups() is None
    joined = source_for(f"{media / 'shards'}::{second}", DataConfig())
    assert joined.shards() == [str(first), str(second), str(second)]
    assert source_for("emoji-style:test", DataConfig()).split("train") == "emoji-style:train"
