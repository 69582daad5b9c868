"""benchmarks/bridges.py's seed statistics: means and deviations per cell, and the two-sigma win rule."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bridges

SUITE, METRIC = "emoji-style", "text_to_image_R@1"


def cell(*values: float) -> dict:
    out: dict = {}
    for seed, value in enumerate(values):
        bridges.add_seed(out, seed, {METRIC: value, "train_steps": 100 + seed})
    return out


def test_a_cell_holds_every_seed_and_their_mean_and_sample_deviation() -> None:
    c = cell(0.30, 0.34, 0.35)
    assert c["n_seeds"] == 3 and set(c["per_seed"]) == {"0", "1", "2"}
    assert c[METRIC] == pytest.approx(statistics.fmean([0.30, 0.34, 0.35]))
    assert c["std"][METRIC] == pytest.approx(statistics.stdev([0.30, 0.34, 0.35]))
    bridges.add_seed(c, 1, {METRIC: 0.40})  # a seed run again replaces its figure, keeps its other figures
    assert c["per_seed"]["1"] == {METRIC: 0.40, "train_steps": 101}
    assert c[METRIC] == pytest.approx(statistics.fmean([0.30, 0.40, 0.35]))


def test_a_win_needs_more_than_two_standard_deviations_of_the_difference() -> None:
    base = cell(0.35, 0.36, 0.37)  # std 0.01
    sd = math.hypot(0.01, 0.01)
    diff, got_sd, verdict = bridges.compare(cell(0.38, 0.39, 0.40), base, METRIC)  # +0.03 > 2 * 0.0141
    assert (diff, got_sd, verdict) == (pytest.approx(0.03), pytest.approx(sd), "win")
    assert bridges.compare(cell(0.37, 0.38, 0.39), base, METRIC)[2] == "within noise"  # +0.02 < 0.0283
    assert bridges.compare(cell(0.31, 0.32, 0.33), base, METRIC)[2] == "loss"
    assert bridges.compare(cell(0.50), base, METRIC)[2] == "one seed: no verdict"


def test_table_shows_spread_and_verdicts(tmp_path: Path) -> None:
    results = {
        "_meta": {"machine": "test", "commands": ["python benchmarks/bridges.py --seeds 0 1 2"]},
        "clip": {SUITE: cell(0.35, 0.36, 0.37)},
        "fdt": {SUITE: cell(0.38, 0.39, 0.40)},
        "codebook": {SUITE: {METRIC: 0.30}},  # a cell from before seeds were recorded
    }
    out = tmp_path / "bridges.md"
    bridges.write_table(results, out)
    table = out.read_text()
    assert "| emoji-style | text_to_image_R@1 | 0.360 ± 0.010 | 0.390 ± 0.010 | 0.300 |" in table
    assert "| emoji-style | text_to_image_R@1 | fdt - clip | +0.030 | 0.014 | 3 / 3 | win |" in table
    assert "| codebook - clip | -0.060 | n/a | 1 / 3 | one seed: no verdict |" in table
    assert "emoji-voice" not in table  # suites no cell has are left out
    json.dumps(results)  # the cells stay JSON


def test_a_fused_cell_is_compared_with_the_baselines_plain_metric(tmp_path: Path) -> None:
    fused = "fused_text_to_image_R@1"
    fdt = cell(0.30, 0.31, 0.32)
    for seed, value in enumerate((0.40, 0.41, 0.42)):
        bridges.add_seed(fdt, seed, {fused: value})
    base = cell(0.35, 0.36, 0.37)
    assert bridges.compare(fdt, base, fused, METRIC)[:2] == (pytest.approx(0.05), pytest.approx(math.hypot(0.01, 0.01)))
    results = {
        "_meta": {"machine": "test", "commands": []},
        "clip": {"corpus-style": base},
        "fdt": {"corpus-style": fdt},
    }
    bridges.write_table(results, tmp_path / "b.md")
    table = (tmp_path / "b.md").read_text()
    assert f"| corpus-style | {fused} vs {METRIC} | fdt - clip | +0.050 | 0.014 | 3 / 3 | win |" in table
    assert f"| corpus-style | {METRIC} | fdt - clip | -0.050 | 0.014 | 3 / 3 | loss |" in table


def test_a_map_is_compared_with_its_own_word_blind_control(tmp_path: Path) -> None:
    fdt: dict = {}
    for seed, (phrase, control) in enumerate(((0.50, 0.30), (0.52, 0.31), (0.54, 0.32))):
        bridges.add_seed(fdt, seed, {"pointing_game_phrase": phrase, "pointing_game_phrase_control": control})
    results = {"_meta": {"machine": "test", "commands": []}, "fdt": {"emoji-scenes": fdt}}
    bridges.write_table(results, tmp_path / "b.md")
    table = (tmp_path / "b.md").read_text()
    row = "| emoji-scenes | fdt | pointing_game_phrase - pointing_game_phrase_control | +0.210 | 0.022 | win |"
    assert row in table
    assert "caption_map" not in table  # a control the cell lacks gives no row
