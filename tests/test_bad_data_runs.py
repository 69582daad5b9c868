"""Bad data through whole runs: ``data.skip_bad`` in training and in its evaluations (counted in out.log and
metrics.jsonl), data smaller than a batch, and ``codebridge eval`` reading data with ``--set data.*``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from codebridge.cli import main
from codebridge.config import ConfigError
from codebridge.train import train
from test_preprocess_image import bomb_png
from test_retrieval import tiny_model
from test_trainer import one_thread, read_metrics, tiny_config, write_shapes  # noqa: F401  (one_thread: a fixture)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_trainer's shapes, in a folder of this module's own (the tests add files beside them)."""
    folder = tmp_path_factory.mktemp("shapes")
    return {"train": write_shapes(folder, "train", 8, seed=0), "val": write_shapes(folder, "val", 3, seed=1)}


def with_bad_rows(source: Path, name: str, bad: dict[str, bytes]) -> Path:
    """A copy of a shapes JSONL file plus one row per bad image (file name -> bytes), written beside it."""
    rows = source.read_text().splitlines()
    for file, data in bad.items():
        (source.parent / file).write_bytes(data)
        rows.insert(3, json.dumps({"image": file, "text": "a broken picture", "labels": {"concept": 0}}))
    path = source.parent / name
    path.write_text("\n".join(rows) + "\n")
    return path


def test_skip_bad_covers_training_and_its_evaluations(shapes: dict[str, Path], tmp_path: Path) -> None:
    """Issue 16 items 7, 8 and 10: a decompression bomb and a broken file in data.train, a broken file in data.val."""
    train_spec = with_bad_rows(shapes["train"], "train-bad.jsonl", {"bomb.png": bomb_png(), "text.png": b"not a png"})
    val_spec = with_bad_rows(shapes["val"], "val-bad.jsonl", {"val-text.png": b"not a png either"})
    cfg = tiny_config(shapes, tmp_path / "run", "data.skip_bad=true", "train.steps=20", "train.eval_every=10")
    cfg.data.train, cfg.data.val = str(train_spec), str(val_spec)
    run = train(cfg)

    final = json.loads((run / "eval.json").read_text())
    assert final["image_to_text_n_queries"] == len(shapes["val"].read_text().splitlines())  # the bad one left out
    assert [r["bad_samples"] for r in read_metrics(run)][-1] == 2
    log = (run / "out.log").read_text()
    assert log.count("skipping bad sample") == 2  # once per sample, though 20 steps are 3 epochs
    assert "claims 20000x20000 pixels, more than the limit" in log
    assert log.count("evaluation skipped 1 bad sample(s)") == 2  # at step 10 and at the end
    assert "epoch 1: skipped 2 bad sample(s)" in log and "skipped 2 distinct bad sample(s) in all" in log


def test_a_bad_row_skipped_while_reading_reaches_out_log(shapes: dict[str, Path], tmp_path: Path) -> None:
    train_spec = shapes["train"].parent / "train-missing.jsonl"
    rows = shapes["train"].read_text() + json.dumps({"image": "gone.png", "text": "gone"}) + "\n"
    train_spec.write_text(rows)
    cfg = tiny_config(shapes, tmp_path / "run", "data.skip_bad=true", "train.steps=2", "data.val=null")
    cfg.data.train = str(train_spec)
    run = train(cfg)
    assert "skipped 1 bad sample(s) (missing media file: 1)" in (run / "out.log").read_text()
    assert read_metrics(run)[-1]["bad_samples"] == 1


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            1,
            "1 sample(s) over 1 rank(s) make no full batch of train.batch_size=16; lower train.batch_size (e.g. "
            "--set train.batch_size=1) or add data",
        ),
        (0, "0 sample(s) over 1 rank(s) make no full batch of train.batch_size=16; add data"),
    ],
)
def test_data_smaller_than_a_batch_is_a_one_line_error(
    shapes: dict[str, Path], tmp_path: Path, rows: int, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 9: one row, or a header only, used to end in a ValueError traceback."""
    first = shapes["train"].read_text().splitlines()[0]
    image = json.loads(first)["image"]
    spec = shapes["train"].parent / f"rows-{rows}.csv"
    spec.write_text("filepath,title\n" + f"{image},a red circle\n" * rows)
    cfg = tiny_config(shapes, tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape(f"data.train {spec}: {expected}")):
        cfg.data.train = str(spec)
        train(cfg)
    assert main(["data", "check", str(spec)]) == (1 if rows == 0 else 0)
    assert ("no samples" in capsys.readouterr().out) == (rows == 0)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    tiny_model(["image", "text"], ["red", "blue", "green"]).save(tmp_path / "model")
    return tmp_path / "model"


def test_eval_reads_its_data_with_set_data_fields(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16 item 7: eval suggested --set data.skip_bad=true and data.csv_separator but accepted neither."""
    from test_sources import make_image

    for colour in ("red", "blue", "green"):
        make_image(tmp_path / f"{colour}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = ["filepath;title", "red.png;red", "blue.png;blue", "broken.png;broken", "green.png;green"]
    spec = tmp_path / "semicolons.csv"
    spec.write_text("\n".join(lines) + "\n")
    command = ["eval", "--model", str(model_dir), "--data", str(spec), "--task", "retrieval"]

    assert main(command) == 2
    assert "set data.csv_separator" in capsys.readouterr().err
    assert main([*command, "--set", "data.csv_separator=;"]) == 2
    err = capsys.readouterr().err
    assert "semicolons.csv:4: image" in err and "--set data.skip_bad=true to skip" in err
    assert main([*command, "--set", "data.csv_separator=;", "--set", "data.skip_bad=true"]) == 0
    assert json.loads(capsys.readouterr().out)["image_to_text_n_queries"] == 3
    assert "semicolons.csv: evaluation skipped 1 bad sample(s) (data.skip_bad); first: " in caplog.text
    assert main([*command, "--set", "train.lr=1"]) == 2
    assert "eval accepts data.* fields only" in capsys.readouterr().err
