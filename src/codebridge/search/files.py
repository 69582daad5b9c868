"""Index files are written with the project's atomic writes (``codebridge.files``): a reader, or a restarted build,
sees the old file or the whole new one, and a full disk names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse as sp

from codebridge.config import ConfigError
from codebridge.files import atomic_path, atomic_write_json


def write_json(path: Path, value: Any) -> None:
    atomic_write_json(path, value, indent=1)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def save_sparse(path: Path, matrix: sp.spmatrix) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: save_npz would add ".npz" to the name
        sp.save_npz(f, matrix)


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); {what}") from None
