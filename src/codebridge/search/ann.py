"""Dense nearest-neighbour search with FAISS: exact for small collections, IVF / IVF-PQ / HNSW for large ones.

Scores are inner products, as the model's ``similarity``. Whatever the engine, the top candidates are re-ranked
exactly against the stored float32 embeddings, so a compressed (PQ) index only has to find the right candidates.
The parameters are written to ``ann.json`` and recorded in ``index.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from codebridge.config import ConfigError
from codebridge.files import atomic_path, atomic_write_json

ANN_FILE = "ann.faiss"
PARAMS_FILE = "ann.json"
KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
EXACT_UP_TO = 50_000  # auto: below this many items an exact scan is fast enough (and exact)
CALIBRATION_QUERIES = 256  # build time: queries that choose the IVF nprobe (calibrate_nprobe)
CALIBRATION_RECALL = 0.95  # the recall@10 against an exact scan the chosen nprobe must reach


def choose(kind: str, n: int, dim: int) -> dict[str, Any]:
    """The engine and its parameters for ``n`` vectors of width ``dim`` (``kind="auto"``: flat, then IVF)."""
    if kind not in KINDS:
        raise ConfigError(f"--ann {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "flat" if n <= EXACT_UP_TO else "ivf"
    params: dict[str, Any] = {"kind": kind, "metric": "inner_product", "n": n, "dim": dim, "rerank": 1}
    if kind in ("ivf", "ivfpq"):
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        params |= {"nlist": nlist, "nprobe": max(1, min(nlist, nlist // 32 + 8))}  # calibrate_nprobe lowers it
    if kind == "ivfpq":
        m = next(m for m in (dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0)
        params |= {"pq_m": m, "pq_bits": 8, "rerank": 10}
    if kind == "hnsw":
        params |= {"M": 32, "ef_construction": 80, "ef_search": 64}
    return params


def _new_index(params: dict[str, Any]) -> faiss.Index:
    dim, kind = params["dim"], params["kind"]
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        return faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFPQ(
        quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"], faiss.METRIC_INNER_PRODUCT
    )


def calibrate_nprobe(
    index: faiss.Index, vectors: np.ndarray, most: int, target: float = CALIBRATION_RECALL, seed: int = 0
) -> dict[str, Any]:
    """The smallest nprobe (powers of two up to ``most``) whose recall@10 against an exact scan reaches ``target``
    on calibration queries, as FAISS's auto-tuning does.

    The queries are the normalised means of random pairs of items: points between items, harder for an inverted
    file than the items themselves (which always sit in their own list). ``most`` is kept when nothing smaller
    reaches the target; the chosen value and the recall it had are recorded with the index."""
    rng = np.random.default_rng(seed + 1)
    pairs = vectors[rng.integers(0, len(vectors), (CALIBRATION_QUERIES, 2))].sum(axis=1)
    queries = np.ascontiguousarray(pairs / np.linalg.norm(pairs, axis=1, keepdims=True), dtype=np.float32)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    for nprobe in [*(2**i for i in range(int(math.log2(max(most, 1))) + 1) if 2**i < most), most]:
        ivf.nprobe = nprobe
        _, found = index.search(queries, 10)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        if recall >= target or nprobe == most:
            return {"nprobe": nprobe, "calibration": {"queries": len(queries), "target": target, "recall": recall}}
    raise AssertionError("unreachable: the loop ends at most")


def _tune(index: faiss.Index, params: dict[str, Any]) -> None:
    """Search-time parameters, which faiss does not store in the index file."""
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    if "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]


def build_ann(embeddings: np.ndarray, out: Path, kind: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Build, save (``ann.faiss``, ``ann.json``) and return the parameters of the engine for ``embeddings``."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    params = choose(kind, *vectors.shape)
    index = _new_index(params)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.permutation(len(vectors))[: 64 * params["nlist"]]]
        index.train(sample)
    index.add(vectors)
    if "nprobe" in params:
        params |= calibrate_nprobe(index, vectors, params["nprobe"], seed=seed)
    with atomic_path(out / ANN_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_json(out / PARAMS_FILE, params, indent=1)
    return params


class DenseIndex:
    """The ANN engine of an index folder plus its exact vectors for re-ranking."""

    def __init__(self, folder: Path, embeddings: np.ndarray) -> None:
        self.params = json.loads((folder / PARAMS_FILE).read_text())
        self.index = faiss.read_index(str(folder / ANN_FILE))
        _tune(self.index, self.params)
        self.embeddings = embeddings

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], rows [Q, k]) best first; rows are -1 (score -inf) past the collection's end."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.embeddings))
        wanted = min(len(self.embeddings), k * self.params.get("rerank", 1))
        _, candidates = self.index.search(queries, wanted)
        return exact_rerank(self.embeddings, queries, candidates, k)


def exact_rerank(
    embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's candidate rows by exact inner product (-1 candidates stay last)."""
    safe = np.where(candidates < 0, 0, candidates)
    scores = np.einsum("qe,qce->qc", queries, embeddings[safe])
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


def brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by a full scan in numpy: the reference every engine is measured against."""
    scores = queries @ embeddings.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order
