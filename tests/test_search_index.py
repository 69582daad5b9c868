"""Index a collection, search it, resume a killed build, refuse another model, FAISS against brute force."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from codebridge.cli import main
from codebridge.config import ConfigError
from codebridge.search.ann import DenseIndex, brute_force, build_ann, calibrate_nprobe, choose
from codebridge.search.index import EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, PARTS_DIR, build_index
from codebridge.search.searcher import BadQuery, ModelMismatch, Searcher
from helpers import free_port
from search_fixtures import caption, make_collection, make_model

N = 40
# `codebridge index` with each part slowed by 0.3 s, so a kill lands while parts remain
SLOW_INDEX = """
import sys, time
import codebridge.search.index as index
embed = index.embed_part
index.embed_part = lambda *a, **k: (time.sleep(0.3), embed(*a, **k))[1]
from codebridge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(collection CSV, model folder, text index folder)."""
    root = tmp_path_factory.mktemp("search")
    csv = make_collection(root / "data", N)
    model = make_model(root / "model")
    index = build_index(model, str(csv), root / "text-index", "text", batch_size=8, part_size=16, progress=False)
    return csv, model, index


def items(index: Path) -> list[dict]:
    return [json.loads(line) for line in (index / ITEMS_FILE).read_text().splitlines()]


def test_own_caption_finds_its_item(built):
    _, _, index = built
    searcher = Searcher(index)
    for i in (0, 7, N - 1):
        hits = searcher.search("text", caption(i), k=3)
        assert hits[0]["id"] == i and hits[0]["caption"] == caption(i)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert [row["id"] for row in items(index)] == list(range(N))


def test_image_index_found_by_its_own_image(built, tmp_path):
    csv, model, _ = built
    index = build_index(model, str(csv), tmp_path / "image-index", batch_size=16, progress=False)
    searcher = Searcher(index)
    assert searcher.modality == "image"
    hit = searcher.search("image", str(csv.parent / "5.png"), k=1)[0]
    assert (hit["id"], hit["media"]) == (5, str(csv.parent / "5.png"))
    assert searcher.similar(5, k=1)[0]["id"] == 5


def test_cli_search_prints_table_and_json(built, capsys):
    _, _, index = built
    assert main(["search", "--index", str(index), "--text", caption(3), "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id", "source", "caption"]
    assert table[1].split()[:1] == ["1"] and table[1].split()[2] == "3" and len(table) == 3
    assert main(["search", "--index", str(index), "--text", caption(3), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["id"] == 3


def test_bad_queries_are_clear(built, capsys):
    _, _, index = built
    searcher = Searcher(index)
    with pytest.raises(BadQuery, match="unknown item id 999"):
        searcher.similar(999)
    with pytest.raises(BadQuery, match="not an image format"):
        searcher.search("image", b"not an image")
    with pytest.raises(BadQuery, match="cannot read audio"):
        searcher.search("audio", b"RIFF")
    assert main(["search", "--index", str(index), "--image", "missing.png"]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_index_refuses_another_model(built, tmp_path, capsys):
    csv, _, index = built
    other = make_model(tmp_path / "other", seed=1)
    with pytest.raises(ModelMismatch, match="is not the model index"):
        Searcher(index, other)
    assert main(["search", "--index", str(index), "--model", str(other), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="an index of another build is here"):
        build_index(other, str(csv), index, "text", part_size=16, progress=False)


def test_resume_after_kill_never_reembeds(built, tmp_path):
    csv, model, reference = built
    out = tmp_path / "killed"
    command = [sys.executable, "-c", SLOW_INDEX, "index", "--model", str(model), "--data", str(csv)]
    command += ["--out", str(out), "--modality", "text", "--part-size", "4", "--batch-size", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / PARTS_DIR / "part-00001.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / PARTS_DIR).glob("*.json"))
    assert 2 <= len(done) < N // 4 and not (out / INDEX_FILE).exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / PARTS_DIR).glob("part-*")}
    build_index(model, str(csv), out, "text", batch_size=1, part_size=4, progress=False)
    assert all((out / PARTS_DIR / name).stat().st_mtime_ns == t for name, t in stamps.items() if name.endswith("json"))
    assert [row["id"] for row in items(out)] == list(range(N))  # no duplicate, nothing missing
    np.testing.assert_allclose(np.load(out / EMBEDDINGS_FILE), np.load(reference / EMBEDDINGS_FILE), atol=1e-6)


# ------------------------------------------------------------------------------------------------ FAISS
def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_equals_brute_force(tmp_path):
    x = clustered(500, 16)
    assert build_ann(x, tmp_path)["kind"] == "flat"
    queries = clustered(20, 16, seed=1)
    scores, rows = DenseIndex(tmp_path, x).search(queries, 10)
    ref_scores, ref_rows = brute_force(x, queries, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (rows == ref_rows).all()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_engines_recall_and_exact_scores(tmp_path, kind):
    x = clustered(4000, 16)
    params = build_ann(x, tmp_path, kind=kind)
    assert json.loads((tmp_path / "ann.json").read_text()) == params
    queries = clustered(50, 16, seed=1)
    scores, rows = DenseIndex(tmp_path, x).search(queries, 10)
    _, ref_rows = brute_force(x, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, ref_rows, strict=True)])
    assert recall >= 0.9, recall
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ x.T, rows, 1), atol=1e-5)  # re-ranked exactly


def test_nprobe_is_the_smallest_that_reaches_the_calibration_recall(tmp_path):
    x = clustered(4000, 16)
    params = build_ann(x, tmp_path, kind="ivf")
    chosen, calibration = params["nprobe"], params["calibration"]
    assert calibration["recall"] >= calibration["target"] == 0.95
    if chosen > 1:  # half of it (the previous power of two) must miss the target on the same queries
        index = faiss.read_index(str(tmp_path / "ann.faiss"))
        lower = calibrate_nprobe(index, x, chosen // 2)
        assert lower["calibration"]["recall"] < 0.95 and lower["nprobe"] == chosen // 2


def test_auto_chooses_by_size():
    assert choose("auto", 1000, 64)["kind"] == "flat"
    big = choose("auto", 1_000_000, 64)
    assert big["kind"] == "ivf" and big["nlist"] == 4000 and 1 <= big["nprobe"] <= big["nlist"]
    with pytest.raises(ConfigError, match="expected one of"):
        choose("lsh", 10, 4)


def test_two_processes_build_the_same_index(built, tmp_path):
    """torchrun with 2 gloo processes: each embeds its parts, rank 0 merges; equal to the 1-process index."""
    csv, model, reference = built
    out = tmp_path / "dist"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    command += ["-m", "codebridge", "index", "--model", str(model), "--data", str(csv), "--out", str(out)]
    command += ["--modality", "text", "--part-size", "16", "--batch-size", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert items(out) == items(reference)
    np.testing.assert_allclose(np.load(out / EMBEDDINGS_FILE), np.load(reference / EMBEDDINGS_FILE), atol=1e-6)
