"""JSON Lines files: one JSON object per line, one sample per object.

Keys: one per registered media modality (``image``, ``audio``, ``video``...: paths, relative to the file's folder),
``text`` (a caption or a list of captions), optional ``key`` (default ``<file stem>-<line>``), ``labels`` ({name:
int}) and ``meta`` (any object). Any other key is an error, so a misspelt ``caption`` is caught instead of silently
dropping the text. The file must be UTF-8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codebridge.data.sample import Sample
from codebridge.data.sources.spec import (
    SOURCES,
    ListSource,
    RowError,
    clean_texts,
    encoding_error,
    existing_file,
    media_modalities,
    media_path,
    parse_labels,
)


def parse_object(line: str, folder: Path, default_key: str) -> dict[str, Any]:
    """``Sample`` fields of one JSON line."""
    files = media_modalities()
    keys = ("key", *files, "text", "labels", "meta")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RowError("malformed row", f"not valid JSON ({exc}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise RowError("malformed row", f"expected a JSON object, got {type(row).__name__}")
    if unknown := sorted(set(row) - set(keys)):
        raise RowError("malformed row", f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(keys)}")
    fields: dict[str, Any] = {"key": row.get("key", default_key), "media": {}}
    if not isinstance(fields["key"], str):
        raise RowError("malformed row", f"key must be a string, got {fields['key']!r}")
    for modality in files:
        if modality in row:
            if not isinstance(row[modality], str) or not row[modality].strip():
                raise RowError("malformed row", f"{modality} must be a file path, got {row[modality]!r}", modality)
            fields["media"][modality] = media_path(row[modality].strip(), folder, modality)
    if "text" in row:
        texts = [row["text"]] if isinstance(row["text"], str) else row["text"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RowError("malformed row", f"text must be a string or a list of strings, got {row['text']!r}", "text")
        fields["media"]["text"] = clean_texts(texts)
    if not fields["media"]:
        raise RowError("malformed row", f"no modality: give at least one of {', '.join((*files, 'text'))}")
    if "labels" in row:
        fields["labels"] = parse_labels(row["labels"])
    if "meta" in row:
        if not isinstance(row["meta"], dict):
            raise RowError("malformed row", f"meta must be a JSON object, got {row['meta']!r}")
        fields["meta"] = row["meta"]
    return fields


@SOURCES.register("jsonl")
class JsonlSource(ListSource):
    accepts = "a .jsonl file"

    @classmethod
    def handles(cls, spec: str) -> bool:
        return spec.lower().endswith(".jsonl")

    def read(self) -> list[Sample]:
        path = existing_file(self.spec)
        folder = path.resolve().parent
        samples = []
        try:
            with path.open(encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    source = f"{self.spec}:{lineno}"
                    try:
                        samples.append(Sample(source=source, **parse_object(line, folder, f"{path.stem}-{lineno}")))
                    except RowError as error:
                        self.problems.add(source, error)
        except UnicodeDecodeError:
            raise encoding_error(path) from None
        return samples
