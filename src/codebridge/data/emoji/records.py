"""JSON Lines tables of the benchmark: written deterministically, read with errors that name file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from codebridge.files import atomic_path


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) pairs; a broken line is reported as ``path:line`` with how to fix it."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({exc}); rebuild with `codebridge data emoji`"
                ) from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object; rebuild with `codebridge data emoji`")
            rows.append((lineno, row))
    return rows
