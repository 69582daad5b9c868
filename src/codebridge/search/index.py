"""Build a search index: embed one modality of a collection in numbered parts, resumable, then merge.

Folder layout (``INDEX``)::

    build.json            what is being built (model fingerprint, spec, modality, part size); checked on resume
    parts/part-00000.codes.npz  its sparse code weights [n, K] (bridges with a discrete space)
    parts/part-00000.npy  float32 [n, E] embeddings of part 0   (written atomically, after the codes)
    parts/part-00000.json its metadata rows + checksum          (written second, atomically: the part is done)
    index.json            the finished index (model, spec, count, dim, ANN parameters)
    embeddings.npy        all embeddings, row r <-> items.jsonl line r
    items.jsonl           one row per item: id, key, source, caption, modality, media
    ann.faiss, ann.json   the dense ANN engine and its parameters (search/ann.py)
    sparse.npz, codes.json  the inverted index over codes and each code's top words (search/sparse.py)

A part's ``.json`` is its entry in the manifest of completed parts: a restart embeds only parts without one, so
a kill at any moment loses at most the part in progress. With ``torchrun`` rank r embeds parts r, r + W, ...;
rank 0 waits for every rank and merges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy import sparse as sp
from torch.utils.data import DataLoader
from tqdm import tqdm

from codebridge.config import ConfigError, DataConfig
from codebridge.data.dataset import SampleDataset, collate
from codebridge.data.modalities.text import SETTINGS_FILE, TOKENIZER_FILE
from codebridge.data.preprocess import PREP_FILE
from codebridge.data.sample import Sample
from codebridge.data.sources import open_source
from codebridge.data.sources.spec import media_modalities
from codebridge.eval.codes import code_table, collect
from codebridge.files import atomic_write_text, sha256_file
from codebridge.models.model import CONFIG_FILE, WEIGHTS_FILE, CodeBridgeModel
from codebridge.search.ann import build_ann
from codebridge.search.encode import encode_entry, has_codes
from codebridge.search.files import read_json, save_npy, save_sparse, write_json
from codebridge.search.sparse import SparseIndex

BUILD_FILE = "build.json"
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.jsonl"
PARTS_DIR = "parts"
FORMAT = 1


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the weights, the config and the preprocessing files: equal iff the model embeds the same."""
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE, PREP_FILE, TOKENIZER_FILE, SETTINGS_FILE):
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ items
def collection(spec: str, data: DataConfig, modality: str) -> list[Sample]:
    """The samples of ``spec`` that have ``modality``; an item's id is its position here (stable across runs)."""
    return [s for s in open_source(spec, data) if s.has(modality)]


def item_row(item_id: int, sample: Sample, modality: str) -> dict[str, Any]:
    media = sample.media.get(modality) if modality != "text" else None
    return {
        "id": item_id,
        "key": sample.key,
        "source": sample.source,
        "caption": sample.media["text"][0] if sample.has("text") else "",
        "modality": modality,
        "media": media if isinstance(media, str) else "",
        "has": [m for m in media_modalities() if sample.has(m)],
    }


# ------------------------------------------------------------------------------------------------ build
def _rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun; the process group is started here when torchrun set one up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _check_build(out: Path, build: dict[str, Any]) -> None:
    """Start a new build, or check that the one found in ``out`` is the same (so resuming is safe)."""
    path = out / BUILD_FILE
    if path.is_file():
        found = read_json(path, "delete the index folder to rebuild it")
        diff = [k for k in build if found.get(k) != build[k]]
        if diff:
            raise ConfigError(
                f"{path}: an index of another build is here ({', '.join(f'{k}: {found.get(k)!r}' for k in diff)}); "
                "pass another --out, or delete the folder to rebuild"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, build)


def part_done(parts: Path, part: int) -> bool:
    return (parts / f"part-{part:05d}.json").is_file()


def embed_part(
    model: CodeBridgeModel,
    samples: list[Sample],
    first: int,
    modality: str,
    batch_size: int,
    skip_bad: bool,
    progress: tqdm,
) -> tuple[np.ndarray, sp.csr_matrix | None, list[dict[str, Any]]]:
    """Embeddings, code weights (None without a discrete space) and metadata rows of ``samples`` (ids from
    ``first``); bad items are dropped when ``skip_bad``."""
    dataset = SampleDataset(samples, [modality], model.preprocessors, train=False, skip_bad=skip_bad)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    vectors, codes, rows = [], [], []
    for n, batch in enumerate(loader):
        progress.update(min(batch_size, len(samples) - n * batch_size))
        if batch is None:
            continue
        embedding, weights = encode_entry(model, modality, batch[modality])
        vectors.append(embedding)
        codes.append(weights)
        rows += [item_row(first + i, samples[i], modality) for i in batch["index"].tolist()]
    dim = model.cfg.model.bridge.embed_dim
    dense = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    space = model.bridge.discrete_space()
    sparse = None if space is None else sp.csr_matrix(np.concatenate(codes) if codes else np.zeros((0, space.size)))
    return dense, sparse, rows


def code_words(
    model: CodeBridgeModel, samples: list[Sample], limit: int = 2000, words: int = 5
) -> dict[int, list[str]]:
    """Top words of each code over the captions of up to ``limit`` samples spread over the collection (the code
    analysis of ``eval/codes.py``); empty for a model without text or a collection without captions."""
    captioned = [s for s in samples if s.has("text")]
    if "text" not in model.modalities or not captioned or not has_codes(model):
        return {}
    chosen = [captioned[i] for i in np.linspace(0, len(captioned) - 1, min(limit, len(captioned))).astype(int)]
    found, _ = collect(model, chosen, ["text"])
    return {e["code"]: [w for w, _ in e["top_words"]] for e in code_table(model, chosen, found, None, words)}


def build_index(
    model_dir: str | Path,
    spec: str,
    out: str | Path,
    modality: str | None = None,
    *,
    batch_size: int = 64,
    part_size: int = 1024,
    skip_bad: bool = False,
    ann: str = "auto",
    progress: bool = True,
) -> Path:
    """Embed ``spec`` with the model in ``model_dir`` into the index folder ``out`` (module docstring)."""
    model_dir, out = Path(model_dir), Path(out)
    model = CodeBridgeModel.load(model_dir)
    modality = modality or next((m for m in model.modalities if m != "text"), "text")
    if modality not in model.modalities:
        raise ConfigError(f"--modality {modality}: the model has no {modality} encoder; it has {model.modalities}")
    spec = str(Path(spec).resolve()) if Path(spec).exists() else spec  # the server may run elsewhere
    data = dataclasses.replace(model.cfg.data, skip_bad=skip_bad)
    samples = collection(spec, data, modality)
    if not samples:
        raise ConfigError(f"{spec}: no sample has {modality}; pick --modality among {model.modalities}")
    build = {
        "format": FORMAT,
        "model_fingerprint": model_fingerprint(model_dir),
        "spec": spec,
        "modality": modality,
        "part_size": part_size,
        "skip_bad": skip_bad,
        "count": len(samples),
    }
    rank, world = _rank_world()
    if rank == 0:
        _check_build(out, build)
    if world > 1:
        dist.barrier()
        _check_build(out, build)
    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    n_parts = -(-len(samples) // part_size)
    mine = [p for p in range(rank, n_parts, world)]
    todo = [p for p in mine if not part_done(parts, p)]
    total = sum(min(part_size, len(samples) - p * part_size) for p in mine)
    left = sum(min(part_size, len(samples) - p * part_size) for p in todo)
    bar = tqdm(total=total, initial=total - left, unit="item", desc=f"index {modality}", disable=not progress)
    with bar, torch.inference_mode():
        for part in todo:
            first = part * part_size
            vectors, codes, rows = embed_part(
                model, samples[first : first + part_size], first, modality, batch_size, skip_bad, bar
            )
            if codes is not None:
                save_sparse(parts / f"part-{part:05d}.codes.npz", codes)
            npy = parts / f"part-{part:05d}.npy"
            save_npy(npy, vectors.astype(np.float32))
            write_json(parts / f"part-{part:05d}.json", {"part": part, "sha256": sha256_file(npy), "items": rows})
    if world > 1:
        dist.barrier()
    if rank == 0:
        merge_parts(out, model_dir, build, n_parts, ann, lambda: code_words(model, samples))
    if world > 1:
        dist.barrier()
    return out


def merge_parts(
    out: Path,
    model_dir: Path,
    build: dict[str, Any],
    n_parts: int,
    ann: str,
    words: Callable[[], dict[int, list[str]]],
) -> None:
    """Concatenate the parts into ``embeddings.npy`` + ``items.jsonl``, build the ANN index and (codes found) the
    inverted index with each code's ``words()``, then write ``index.json``."""
    parts = out / PARTS_DIR
    vectors, codes, rows = [], [], []
    for part in range(n_parts):
        record = read_json(parts / f"part-{part:05d}.json", "the part is not finished; rerun the same command")
        npy = parts / f"part-{part:05d}.npy"
        if sha256_file(npy) != record["sha256"]:
            raise ConfigError(f"{npy}: checksum differs from its manifest entry; delete both files and rerun")
        vectors.append(np.load(npy))
        if (parts / f"part-{part:05d}.codes.npz").is_file():
            codes.append(sp.load_npz(parts / f"part-{part:05d}.codes.npz"))
        rows += record["items"]
    embeddings = np.concatenate(vectors).astype(np.float32)
    save_npy(out / EMBEDDINGS_FILE, embeddings)
    atomic_write_text(out / ITEMS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    params = build_ann(embeddings, out, kind=ann)
    if codes:
        SparseIndex(sp.vstack(codes), words()).save(out)
    info = {
        **build,
        "model": str(model_dir.resolve()),
        "items": len(rows),
        "dim": int(embeddings.shape[1]),
        "ann": params,
        "sparse": bool(codes),
    }
    write_json(out / INDEX_FILE, info)
