"""A tiny run of benchmarks/ddp_overlap.py (two real gloo processes), so the benchmark cannot rot between runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ddp_overlap

TINY = ["model.image.width=32", "model.image.depth=1", "model.text.width=32", "model.text.depth=1"]


def test_both_gradient_syncs_are_timed_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    argv = ["--scales", "emoji", "--batch-size", "4", "--repeats", "2", "--out", str(out)]
    assert ddp_overlap.main(argv + [f"--set={o}" for o in [*TINY, "prep.text.vocab_size=300"]]) == 0
    results = json.loads(out.read_text())
    emoji = results["emoji"]
    assert set(emoji["seconds"]) == {"manual", "overlap", "overlap_static", "allreduce"}
    assert all(len(times) == 2 and min(times) > 0 for times in emoji["seconds"].values())
    seconds = emoji["median_seconds"]
    assert emoji["manual_over_overlap"] == pytest.approx(seconds["manual"] / seconds["overlap"])
    assert emoji["batch_size_per_process"] == 4 and emoji["parameters"] > 0
    assert results["_meta"]["command"].startswith("python benchmarks/ddp_overlap.py --scales emoji")
    table = out.with_suffix(".md").read_text()
    assert "| emoji |" in table and results["_meta"]["command"] in table
