"""Sparse search through the bridge's shared discrete space: an inverted index from code/token to items.

Each item is a sparse vector over the K codes (its L2-normalised ``DiscreteSpace.mass``: how many positions use
each code, or the FDT token weights). A query is scored only through the codes it activates: for each active code
the posting list (items, weights) is walked and ``w_query[k] * w_item[k]`` added, so the cost grows with the
postings touched, not the collection. The score equals the dot product of the two sparse vectors, and every hit
can list the codes that made it (``matched``), with the words the code stands for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse as sp

from codebridge.search.files import save_sparse, write_json

SPARSE_FILE = "sparse.npz"
WORDS_FILE = "codes.json"


class SparseIndex:
    """Postings of ``matrix`` ([N items, K codes], CSR rows = items) kept column-wise (CSC: code -> items)."""

    def __init__(self, matrix: sp.spmatrix, words: dict[int, list[str]] | None = None) -> None:
        self.rows = sp.csr_matrix(matrix, dtype=np.float32)
        self.postings = self.rows.tocsc()
        self.words = words or {}

    @property
    def size(self) -> int:
        return self.rows.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the inverted index (item ids, weights, offsets)."""
        p = self.postings
        return p.data.nbytes + p.indices.nbytes + p.indptr.nbytes

    def save(self, folder: Path) -> None:
        save_sparse(folder / SPARSE_FILE, self.rows)
        write_json(folder / WORDS_FILE, {str(k): v for k, v in self.words.items()})

    @classmethod
    def load(cls, folder: Path) -> SparseIndex | None:
        if not (folder / SPARSE_FILE).is_file():
            return None
        words = json.loads((folder / WORDS_FILE).read_text()) if (folder / WORDS_FILE).is_file() else {}
        return cls(sp.load_npz(folder / SPARSE_FILE), {int(k): v for k, v in words.items()})

    def scores(self, query: np.ndarray) -> np.ndarray:
        """[N] score of every item: the postings of the query's active codes, accumulated."""
        out = np.zeros(self.rows.shape[0], np.float32)
        p = self.postings
        for k in np.flatnonzero(query):
            start, stop = p.indptr[k], p.indptr[k + 1]
            out[p.indices[start:stop]] += query[k] * p.data[start:stop]
        return out

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [k], rows [k]) best first; items sharing no code with the query are not returned."""
        scores = self.scores(query)
        touched = np.flatnonzero(scores > 0)
        order = touched[np.argsort(-scores[touched], kind="stable")[:k]]
        return scores[order], order

    def row_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact sparse scores of the given rows (for hybrid scoring of dense candidates)."""
        return np.asarray(self.rows[rows] @ query, dtype=np.float32).ravel()

    def matched(self, query: np.ndarray, row: int, top: int = 5) -> list[dict[str, Any]]:
        """The codes shared by the query and item ``row``, largest contribution first, with their words."""
        item = self.rows[row]
        parts = [(int(k), float(query[k] * w)) for k, w in zip(item.indices, item.data, strict=True) if query[k] > 0]
        parts.sort(key=lambda kv: -kv[1])
        return [{"code": k, "score": s, "words": self.words.get(k, [])} for k, s in parts[:top]]
