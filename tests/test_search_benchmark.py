"""benchmarks/search.py --small runs end to end and writes its figures (the full run is for the lead)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from codebridge.search.index import build_index
from search_fixtures import make_collection, make_model

ROOT = Path(__file__).resolve().parents[1]


def test_search_benchmark_small(tmp_path):
    csv = make_collection(tmp_path / "data", 20)
    index = build_index(make_model(tmp_path / "model", bridge="codebook"), str(csv), tmp_path / "index", progress=False)
    out = tmp_path / "results"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "search.py"),
        "--index",
        str(index),
        "--small",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "search.json").read_text())
    assert result["ann"]["engine"]["kind"] == "ivf" and result["ann"]["vectors"] == 5000
    assert 0.5 <= result["ann"]["recall_at_10"] <= 1.0
    assert set(result["sparse"]) >= {"dense", "sparse", "hybrid", "bytes_ratio"}
    assert result["server"]["requests"] > 0 and result["server"]["errors"] == 0
    assert "| server, 2 clients" in (out / "search.md").read_text()
