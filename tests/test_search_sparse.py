"""Sparse search through the shared codes: the inverted index scores equal a brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse as sp

from codebridge.cli import main
from codebridge.models.model import CodeBridgeModel, prepare_batch
from codebridge.search.index import build_index
from codebridge.search.searcher import BadQuery, Searcher
from codebridge.search.sparse import SparseIndex
from search_fixtures import caption, make_collection, make_model

N = 30


@pytest.fixture(scope="module", params=["codebook", "fdt"])
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"sparse-{request.param}")
    csv = make_collection(root / "data", N)
    model = make_model(root / "model", bridge=request.param)
    return build_index(model, str(csv), root / "index", "image", batch_size=8, part_size=8, progress=False), model, csv


def brute_force_codes(model_dir, modality, items) -> np.ndarray:
    """[N, K] every item's L2-normalised ``mass``, straight from the bridge's discrete space."""
    model = CodeBridgeModel.load(model_dir)
    entry = prepare_batch(model.preprocessors, modality, items)
    with torch.no_grad():
        features = model.features(modality, entry)
        mass = model.bridge.discrete_space().mass(modality, features).double()
    return (mass / mass.norm(dim=-1, keepdim=True)).numpy()


def test_sparse_scores_equal_brute_force(built):
    index, model, csv = built
    searcher = Searcher(index)
    items = brute_force_codes(model, "image", [str(csv.parent / f"{i}.png") for i in range(N)])
    for text in (caption(2), "word5 thing1", "item"):
        query = searcher.embed("text", text)
        expected = items @ brute_force_codes(model, "text", [text])[0]
        np.testing.assert_allclose(searcher.sparse.scores(query.codes), expected, atol=1e-5)
        hits = searcher.search_query(query, k=5, mode="sparse", explain=True)
        assert [h["score"] for h in hits] == pytest.approx(sorted(expected[expected > 0], reverse=True)[:5], abs=1e-5)
        for hit in hits:  # the matched codes (at most 5 listed) explain the whole score
            if len(hit["matched"]) < 5:
                assert sum(c["score"] for c in hit["matched"]) == pytest.approx(hit["score"], abs=1e-5)
            assert all(isinstance(c["code"], int) and isinstance(c["words"], list) for c in hit["matched"])


def test_inverted_index_walks_only_active_codes():
    rng = np.random.default_rng(0)
    dense = rng.random((200, 64)) * (rng.random((200, 64)) < 0.05)
    index = SparseIndex(sp.csr_matrix(dense))
    query = rng.random(64) * (rng.random(64) < 0.2)
    np.testing.assert_allclose(index.scores(query), dense @ query, rtol=1e-5, atol=1e-6)
    scores, rows = index.search(query, 10)
    assert (np.diff(scores) <= 0).all() and np.allclose(scores, (dense @ query)[rows], atol=1e-6)
    assert index.nbytes < dense.astype(np.float32).nbytes


def test_hybrid_and_words(built, capsys):
    index, _, _ = built
    searcher = Searcher(index)
    assert searcher.modes == ["dense", "sparse", "hybrid"]
    assert searcher.sparse.words and all(isinstance(w, list) for w in searcher.sparse.words.values())
    query = searcher.embed("text", caption(4))
    hybrid = searcher.search_query(query, k=3, mode="hybrid")
    rows = [searcher.row_of[h["id"]] for h in hybrid]
    expected = searcher.embeddings[rows] @ query.dense + searcher.sparse.row_scores(query.codes, np.array(rows))
    assert [h["score"] for h in hybrid] == pytest.approx(expected.tolist(), abs=1e-5)
    assert main(["search", "--index", str(index), "--text", caption(4), "--mode", "sparse", "--explain"]) == 0
    assert "code " in capsys.readouterr().out


def test_dense_only_index_has_no_sparse_mode(tmp_path):
    csv = make_collection(tmp_path / "data", 6)
    index = build_index(make_model(tmp_path / "model"), str(csv), tmp_path / "index", "text", progress=False)
    searcher = Searcher(index)
    assert searcher.modes == ["dense"]
    with pytest.raises(BadQuery, match="no sparse part"):
        searcher.search("text", "item", mode="sparse")
