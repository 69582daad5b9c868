"""``check_dataset``: every bad sample (unreadable row, corrupt media, missing modality) with its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codebridge.cli import main
from codebridge.config import Config, ConfigError
from codebridge.data.check import check_dataset
from test_sources import make_audio, make_image, make_media, make_video, truncate, write_table, write_tar


@pytest.fixture
def media(tmp_path: Path) -> Path:
    return make_media(tmp_path)


@pytest.fixture
def broken_csv(media: Path) -> Path:
    """Two good rows, corrupt image/audio/video files, a missing file and an empty caption (lines 2-8)."""
    truncate(make_image(media / "bad/image.png"), 40)
    truncate(make_audio(media / "bad/audio.wav"), 20)
    truncate(make_video(media / "bad/video.mp4"), 400)
    rows = [
        ["filepath", "title", "audio", "video"],
        ["images/red.png", "red", "audio/low.wav", ""],
        ["bad/image.png", "a broken image", "", ""],
        ["images/blue.png", "blue", "bad/audio.wav", ""],
        ["", "a clip", "", "video/clip.mp4"],
        ["", "a broken clip", "", "bad/video.mp4"],
        ["images/gone.png", "gone", "", ""],
        ["images/green.png", "", "", ""],
    ]
    return write_table(media / "data.csv", rows)


def test_lists_every_bad_sample_with_its_source(broken_csv: Path) -> None:
    report = check_dataset(str(broken_csv), Config())
    found = {(p.source, p.modality, p.kind) for p in report.problems}
    assert found == {
        (f"{broken_csv}:3", "image", "corrupt image"),
        (f"{broken_csv}:4", "audio", "corrupt audio"),
        (f"{broken_csv}:6", "video", "corrupt video"),
        (f"{broken_csv}:7", "image", "missing media file"),
        (f"{broken_csv}:8", "text", "empty caption"),
    }
    assert not report.ok and (report.total, report.bad) == (7, 5)
    assert report.by_reason() == {
        "corrupt image": 1,
        "corrupt audio": 1,
        "corrupt video": 1,
        "missing media file": 1,
        "empty caption": 1,
    }
    text = report.render()
    assert "7 sample(s), 2 ok, 5 bad" in text
    assert all(f"{broken_csv}:{line}" in text for line in (3, 4, 6, 7, 8))
    assert json.loads(json.dumps(report.to_dict()))["bad_by_reason"]["corrupt video"] == 1


def test_required_modalities(media: Path) -> None:
    rows = [["filepath", "title", "audio"], ["images/red.png", "red", "audio/low.wav"], ["images/blue.png", "b", ""]]
    spec = str(write_table(media / "pairs.csv", rows))
    assert check_dataset(spec, Config(), ["image", "text"]).ok
    report = check_dataset(spec, Config(), ["image", "audio"])
    assert [(p.source, p.kind) for p in report.problems] == [(f"{spec}:3", "missing audio")]
    with pytest.raises(
        ConfigError, match=r"--modalities: .speech. is not a registered modality; expected one of image, text"
    ):
        check_dataset(spec, Config(), ["speech"])


def test_shards_name_the_key_of_a_corrupt_member_and_a_damaged_shard(media: Path) -> None:
    good = (media / "images/red.png").read_bytes()
    shards = media / "shards"
    shards.mkdir()
    write_tar(shards / "shard-00000.tar", [("a.png", good), ("a.txt", b"red"), ("b.png", good[:40]), ("b.txt", b"x")])
    damaged = truncate(write_tar(shards / "shard-00001.tar", [(f"{k}.png", good) for k in "cde"]), 2500)
    report = check_dataset(str(shards), Config())
    assert [(p.source, p.kind) for p in report.problems] == [  # reading problems first, then decoding ones
        (str(damaged), "corrupt shard"),
        (f"{shards / 'shard-00000.tar'}:b", "corrupt image"),
    ]
    assert "after key 'c'" in report.problems[0].reason


def test_cli_exit_code_and_json(broken_csv: Path, media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = media / "report.json"
    assert main(["data", "check", str(broken_csv), "--json", str(out)]) == 1
    assert "bad by reason" in capsys.readouterr().out
    assert json.loads(out.read_text())["bad"] == 5
    good = write_table(media / "good.csv", [["filepath", "title"], ["images/red.png", "red"]])
    assert main(["data", "check", str(good), "--modalities", "image,text"]) == 0
