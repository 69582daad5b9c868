"""CSV/TSV caption files, OpenCLIP-compatible: a header row, then one media path and one caption per row.

Columns (names from ``DataConfig``): the caption column ``csv_caption_key`` and at least one media column
(``csv_image_key``, ``csv_audio_key``, ``csv_video_key``; a modality added later: its name); ``label:NAME`` columns
hold integer labels; any other column is ignored. Rows naming the same media files form one item with several
captions in row order, so COCO-style files (five captions per image) and one-pair-per-row files both work. The
separator is ``data.csv_separator``, else tab for ``.tsv`` and, for ``.csv``, whichever of tab and comma the header
line holds more of (OpenCLIP writes tab-separated ``.csv`` files by default). The file must be UTF-8.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebridge.config import ConfigError, DataConfig
from codebridge.data.sample import Sample
from codebridge.data.sources.spec import (
    SOURCES,
    ListSource,
    Problems,
    RowError,
    clean_texts,
    encoding_error,
    existing_file,
    media_modalities,
    media_path,
)

LABEL_PREFIX = "label:"


@dataclass(frozen=True)
class Columns:
    caption: int
    media: dict[str, int]  # modality -> column index
    labels: dict[str, int]  # label name -> column index
    width: int


def find_columns(path: Path, header: list[str], data: DataConfig) -> Columns:
    """Column positions; a ``ConfigError`` listing expected and found columns when the header does not fit."""
    index = {name.strip(): i for i, name in enumerate(header)}
    names = {m: csv_column(data, m) for m in media_modalities()}
    media = {m: index[name] for m, name in names.items() if name in index}
    if data.csv_caption_key not in index or not media:
        hint = " (one column only: is the separator right? set data.csv_separator)" if len(header) == 1 else ""
        raise ConfigError(
            f"{path}: expected a caption column {data.csv_caption_key!r} and at least one media column "
            f"({', '.join(f'{n!r} {m}' for m, n in names.items())}), plus optional 'label:NAME' columns; "
            f"found {', '.join(repr(h) for h in header)}{hint}. Name your columns with e.g. "
            f"--set data.csv_image_key=<column> --set data.csv_caption_key=<column>"
        )
    labels = {name.removeprefix(LABEL_PREFIX): i for name, i in index.items() if name.startswith(LABEL_PREFIX)}
    return Columns(index[data.csv_caption_key], media, labels, len(header))


def csv_column(data: DataConfig, modality: str) -> str:
    """The column of a media modality: ``data.csv_<modality>_key`` where DataConfig has one, else its name."""
    return getattr(data, f"csv_{modality}_key", modality)


def parse_row(row: list[str], columns: Columns, folder: Path) -> tuple[dict[str, str], str, dict[str, int]]:
    """(media modality -> resolved path, caption, labels) of one row."""
    if len(row) != columns.width:
        raise RowError(
            "malformed row", f"expected {columns.width} fields, found {len(row)}; quote fields holding the separator"
        )
    cells = {m: row[i].strip() for m, i in columns.media.items() if row[i].strip()}
    if not cells:
        raise RowError("malformed row", f"no media path: {', '.join(columns.media)} column(s) are all empty")
    media = {m: media_path(cell, folder, m) for m, cell in cells.items()}
    labels = {}
    for name, i in columns.labels.items():
        cell = row[i].strip()
        if not cell:
            continue
        try:
            labels[name] = int(cell)
        except ValueError:
            raise RowError("malformed row", f"label {name!r} must be an integer, got {cell!r}") from None
    return media, clean_texts([row[columns.caption]])[0], labels


def sniff_separator(path: Path) -> str:
    """Tab or comma, whichever the header line of a ``.csv`` holds more of (comma on a tie)."""
    with path.open("rb") as f:
        header = f.readline()
    return "\t" if header.count(b"\t") > header.count(b",") else ","


@SOURCES.register("csv")
class CsvSource(ListSource):
    accepts = "a .csv/.tsv file"

    @classmethod
    def handles(cls, spec: str) -> bool:
        return spec.lower().endswith((".csv", ".tsv"))

    def read(self) -> list[Sample]:
        path = existing_file(self.spec)
        try:
            return _read_rows(self.spec, path, self.data, self.problems)
        except UnicodeDecodeError:
            raise encoding_error(path) from None


def _read_rows(spec: str, path: Path, data: DataConfig, problems: Problems) -> list[Sample]:
    separator = data.csv_separator or ("\t" if path.suffix.lower() == ".tsv" else sniff_separator(path))
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=separator)
        try:
            return _parse(spec, path, reader, data, problems)
        except csv.Error as exc:  # e.g. a field past csv.field_size_limit(): an unclosed quote swallowing the file
            raise ConfigError(
                f"{path}:{reader.line_num}: unreadable CSV ({exc}); close the quote that opens the field, or quote "
                "fields holding the separator"
            ) from None


def _parse(spec: str, path: Path, reader: Any, data: DataConfig, problems: Problems) -> list[Sample]:
    """Samples from the rows of a ``csv.reader``: the header, then one caption per row, grouped by media."""
    folder = path.resolve().parent
    items: dict[tuple[str, ...], tuple[Sample, int]] = {}  # media paths -> (item, its first line)
    header = next(reader, None)
    if header is None:
        raise ConfigError(f"{path}: empty file; expected a header row such as {data.csv_image_key},title")
    columns = find_columns(path, header, data)
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        source = f"{spec}:{line}"
        try:
            media, caption, labels = parse_row(row, columns, folder)
            group = tuple(media.get(m, "") for m in columns.media)
            if group not in items:
                key = "+".join(row[columns.media[m]].strip() for m in columns.media if m in media)
                items[group] = (Sample(key=key, source=source, media={**media, "text": []}, labels=labels), line)
            sample, first = items[group]
            if sample.labels != labels:
                raise RowError(
                    "malformed row", f"labels {labels} differ from {sample.labels} of line {first} (same media)"
                )
            sample.media["text"].append(caption)
        except RowError as error:
            problems.add(source, error)
    return [sample for sample, _ in items.values()]
