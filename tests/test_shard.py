"""``write_shards``: every source rewritten as WebDataset shards reads back as the same samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from codebridge.config import DataConfig
from codebridge.data.sample import BadSampleError, Sample
from codebridge.data.shard import write_shards
from codebridge.data.sources import open_source
from test_sources import COCO_ROWS, make_image, make_media, write_jsonl, write_table

MEDIA = ("image", "audio", "video")


@pytest.fixture
def media(tmp_path: Path) -> Path:
    return make_media(tmp_path)


def assert_same(original: list[Sample], restored: list[Sample]) -> None:
    """Same keys, captions, labels, meta and media bytes (with the same file extension)."""
    assert len(restored) == len(original)
    for a, b in zip(original, restored, strict=True):
        assert (b.key, b.media.get("text", []), b.labels, b.meta) == (a.key, a.media.get("text", []), a.labels, a.meta)
        for modality in MEDIA:
            value = a.media.get(modality)
            if value is None:
                assert b.media.get(modality) is None
            elif isinstance(value, str):
                assert b.media.get(modality) == Path(value).read_bytes()
                assert b.media.get(modality).ext == Path(value).suffix[1:]
            else:
                assert b.media.get(modality) == value and b.media.get(modality).ext == value.ext


TRIMODAL_ROWS = [
    ["filepath", "title", "audio", "video", "label:group"],
    ["images/red.png", "a red square", "audio/low.wav", "", "0"],
    ["images/red.png", "red, spoken low", "audio/low.wav", "", "0"],
    ["images/blue.png", "a blue square", "", "", "1"],
    ["", "a clip", "", "video/clip.mp4", ""],
    ["images/green.png", "green", "audio/high.wav", "", "2"],
]


def make_source(folder: Path, fmt: str) -> str:
    if fmt == "jsonl":
        rows = [
            {"image": "images/red.png", "audio": "audio/low.wav", "text": ["a red square", "red"], "labels": {"g": 0}},
            {"key": "two-lines", "image": "images/blue.png", "text": ["line one\nline two", "blue"]},
            {"video": "video/clip.mp4", "text": "a clip", "meta": {"frames": 4, "tags": ["x", "y"]}},
            {"audio": "audio/high.wav"},
            {"image": "images/green.png", "text": "green", "labels": {"g": 2, "h": 1}},
        ]
        return str(write_jsonl(folder / "data.jsonl", rows))
    separator = "\t" if fmt == "tsv" else ","
    rows = [[f'"{c}"' if "," in c else c for c in row] for row in TRIMODAL_ROWS]
    return str(write_table(folder / f"data.{fmt}", rows, separator))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_round_trip_of_every_format(media: Path, fmt: str) -> None:
    spec = make_source(media, fmt)
    original = open_source(spec, DataConfig())
    assert len(original) == (5 if fmt == "jsonl" else 4)
    paths = write_shards(spec, media / "shards", DataConfig(), samples_per_shard=2)
    assert [p.name for p in paths] == [f"shard-{i:05d}.tar" for i in range(len(paths))]
    assert len(paths) == (len(original) + 1) // 2
    restored = open_source(str(media / "shards"), DataConfig())
    assert_same(original, restored)
    assert restored[0].source == f"{paths[0]}:000000000"

    pattern = f"{media}/shards/shard-{{00000..{len(paths) - 1:05d}}}.tar"
    again = write_shards(pattern, media / "again", DataConfig(), samples_per_shard=2)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # shards of shards: byte-identical


def test_builtin_suite_round_trip(emoji_root: Path, tmp_path: Path) -> None:
    data = DataConfig(root=str(emoji_root))
    original = open_source("emoji-clips:test", data)
    paths = write_shards("emoji-clips:test", tmp_path / "clips", data, samples_per_shard=3)
    assert len(paths) == -(-len(original) // 3)
    assert_same(original, open_source(str(tmp_path / "clips"), data))


def test_skip_bad_rows_are_left_out(media: Path) -> None:
    rows = [["filepath", "title"], ["images/red.png", "red"], ["images/gone.png", "gone"], ["images/blue.png", "b"]]
    spec = str(write_table(media / "bad.csv", rows))
    with pytest.raises(BadSampleError, match=r"bad\.csv:3"):
        write_shards(spec, media / "strict", DataConfig())
    write_shards(spec, media / "lenient", DataConfig(skip_bad=True))
    assert [s.media.get("text", []) for s in open_source(str(media / "lenient"), DataConfig())] == [["red"], ["b"]]


def test_refuses_to_mix_with_existing_shards(media: Path) -> None:
    spec = str(write_table(media / "coco.csv", COCO_ROWS))
    write_shards(spec, media / "out", DataConfig())
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(spec, media / "out", DataConfig())


def test_unsupported_media_extension_names_the_row(media: Path) -> None:
    make_image(media / "images/odd.bmp")
    spec = str(
        write_table(media / "odd.csv", [["filepath", "title"], ["images/red.png", "r"], ["images/odd.bmp", "o"]])
    )
    with pytest.raises(BadSampleError, match=r"odd\.csv:3: image file .*odd\.bmp: extension 'bmp' cannot be stored"):
        write_shards(spec, media / "out", DataConfig())
