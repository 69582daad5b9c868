"""Query a finished index: embed the query with the index's own model, search, describe the hits.

The index records the fingerprint of the model that built it; a different model embeds into another space, so
the searcher refuses it instead of returning meaningless neighbours.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from codebridge.config import ConfigError
from codebridge.data.sample import BadSampleError, Sample
from codebridge.models.model import CodeBridgeModel
from codebridge.search.ann import DenseIndex
from codebridge.search.encode import encode_items
from codebridge.search.files import read_json
from codebridge.search.index import EMBEDDINGS_FILE, INDEX_FILE, ITEMS_FILE, collection, model_fingerprint
from codebridge.search.sparse import SparseIndex

QUERY_MODALITIES = ("text", "image", "audio")
MODES = ("dense", "sparse", "hybrid")


@dataclass(frozen=True)
class Query:
    dense: np.ndarray  # [E]
    codes: np.ndarray | None  # [K] L2-normalised code weights, None without a discrete space


class BadQuery(ValueError):
    """The query cannot be answered (unknown id, a modality the model lacks, an undecodable file).

    ``undecodable`` marks an uploaded file the model's decoders cannot read (HTTP 415, not 400)."""

    def __init__(self, message: str, undecodable: bool = False) -> None:
        super().__init__(message)
        self.undecodable = undecodable


class ModelMismatch(ConfigError):
    """The model offered for querying is not the one the index was built with."""


class Searcher:
    """An index folder opened for queries. Thread-safe: the model runs under a lock."""

    def __init__(self, folder: str | Path, model_dir: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.info = read_json(self.folder / INDEX_FILE, "build it with `codebridge index` (or finish the build)")
        model_dir = Path(model_dir or self.info["model"])
        found = model_fingerprint(model_dir)
        if found != self.info["model_fingerprint"]:
            raise ModelMismatch(
                f"model {model_dir} (fingerprint {found}) is not the model index {self.folder} was built with "
                f"({self.info['model']}, fingerprint {self.info['model_fingerprint']}); query with that model, or "
                f"rebuild the index: codebridge index --model {model_dir} --data ... --out ..."
            )
        self.model = CodeBridgeModel.load(model_dir)
        self.embeddings = np.load(self.folder / EMBEDDINGS_FILE)
        with (self.folder / ITEMS_FILE).open() as f:
            self.items: list[dict[str, Any]] = [json.loads(line) for line in f]
        self.row_of = {item["id"]: row for row, item in enumerate(self.items)}
        self.dense = DenseIndex(self.folder, self.embeddings)
        self.sparse = SparseIndex.load(self.folder)
        self._lock = threading.Lock()

    @property
    def modality(self) -> str:
        return self.info["modality"]

    @property
    def query_modalities(self) -> list[str]:
        return [m for m in QUERY_MODALITIES if m in self.model.modalities]

    @cached_property
    def samples(self) -> list[Sample]:
        """The collection, re-read from its spec (media for thumbnails and audio come from here, by id only)."""
        data = dataclasses.replace(self.model.cfg.data, skip_bad=self.info.get("skip_bad", False))
        return collection(self.info["spec"], data, self.modality)

    def item(self, item_id: int) -> dict[str, Any]:
        if item_id not in self.row_of:
            raise BadQuery(
                f"unknown item id {item_id}; this index holds {len(self.items)} items (ids from /search hits)"
            )
        return self.items[self.row_of[item_id]]

    def sample(self, item_id: int) -> Sample:
        self.item(item_id)
        return self.samples[item_id]

    # ------------------------------------------------------------------------------------------ queries
    def embed(self, modality: str, value: Any) -> Query:
        """The query vector (and code weights) of a caption, or of an image/audio file (path or bytes)."""
        if modality not in self.query_modalities:
            raise BadQuery(f"this index's model cannot read {modality} queries; it reads {self.query_modalities}")
        if modality == "text" and not (isinstance(value, str) and value.strip()):
            raise BadQuery("the text query is empty; write a few words")
        try:
            with self._lock:
                dense, codes = encode_items(self.model, modality, [value])
        except BadSampleError as exc:  # the decoders' message names what is wrong with the file
            raise BadQuery(str(exc), undecodable=True) from None
        except ValueError as exc:
            raise BadQuery(str(exc)) from None
        return Query(dense[0], None if codes is None else codes[0])

    def search_query(
        self, query: Query, k: int = 10, mode: str = "dense", explain: bool = False
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits by ``mode`` (dense, sparse: through the shared codes, hybrid: their sum), best first."""
        if k < 1:
            raise BadQuery(f"k must be a positive number of results, got {k}")
        if mode not in MODES:
            raise BadQuery(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if (mode != "dense" or explain) and (self.sparse is None or query.codes is None):
            raise BadQuery("this index has no sparse part (its bridge has no discrete codes): use mode dense")
        if mode == "dense":
            scores, rows = self.dense.search(query.dense[None], k)
            scores, rows = scores[0], rows[0]
        elif mode == "sparse":
            scores, rows = self.sparse.search(query.codes, k)
        else:
            scores, rows = self._hybrid(query, k)
        hits = []
        for rank, (score, row) in enumerate(zip(scores, rows, strict=True)):
            if row < 0:
                continue
            hit = {"rank": rank + 1, "score": float(score), **self.items[row]}
            if explain:
                hit["matched"] = self.sparse.matched(query.codes, int(row))
            hits.append(hit)
        return hits

    def _hybrid(self, query: Query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense + sparse score over the union of both engines' top ``4k`` candidates, scored exactly."""
        _, dense_rows = self.dense.search(query.dense[None], 4 * k)
        _, sparse_rows = self.sparse.search(query.codes, 4 * k)
        rows = np.union1d(dense_rows[0][dense_rows[0] >= 0], sparse_rows)
        scores = self.embeddings[rows] @ query.dense + self.sparse.row_scores(query.codes, rows)
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], rows[order]

    def search(
        self, modality: str, value: Any, k: int = 10, mode: str = "dense", explain: bool = False
    ) -> list[dict[str, Any]]:
        """Top-``k`` items for a text/image/audio query, best first."""
        return self.search_query(self.embed(modality, value), k, mode, explain)

    def similar(self, item_id: int, k: int = 10, mode: str = "dense", explain: bool = False) -> list[dict[str, Any]]:
        """Items nearest to item ``item_id`` of the index (itself first)."""
        row = self.row_of[self.item(item_id)["id"]]
        codes = None if self.sparse is None else self.sparse.rows[row].toarray()[0]
        return self.search_query(Query(self.embeddings[row], codes), k, mode, explain)

    def describe(self) -> dict[str, Any]:
        return {**self.info, "query_modalities": self.query_modalities, "modes": self.modes}

    @property
    def modes(self) -> list[str]:
        return list(MODES) if self.sparse is not None else ["dense"]
