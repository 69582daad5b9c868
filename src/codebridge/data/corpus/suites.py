"""The corpus suites as data specs (``corpus-style:test``...): each names one shard folder of a built corpus.

The registered source (``source.py``) resolves a spec whose name part is in ``SUITES`` with ``suite_folder`` and
streams it like any shard folder; the folder path itself (``~/.cache/codebridge/corpus/corpus-style/test``) is a
valid spec too.
"""

from __future__ import annotations

from pathlib import Path

from codebridge.config import ConfigError

SUITES = {
    "corpus-style": "emoji art: train on every style but twitter, test on twitter (all concepts)",
    "corpus-style-noto": "emoji art: train on every style but noto-v1, test on noto-v1",
    "corpus-concept": "emoji art of every style: a seeded 20% of each CLDR group's concepts held out",
    "corpus-icons": "named icons and flags: a seeded 20% of each set's (and category's) names held out",
}
SPLITS = ("train", "val", "test")


def suite_folder(spec: str, root: str | Path | None = None) -> Path:
    """``NAME[:train|:val|:test]`` -> its shard folder; ``root``: the corpus folder or a home holding ``corpus/``."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if name not in SUITES:
        raise ConfigError(f"unknown corpus suite {name!r}; choose one of {', '.join(SUITES)}")
    if split not in SPLITS:
        raise ConfigError(f"{name}: unknown split {split!r}; choose train, val or test (e.g. {name}:test)")
    from codebridge.data.corpus.build import MANIFEST, corpus_root  # lazy: the data-source registry imports this

    base = corpus_root(root)
    if not (base / MANIFEST).is_file() and (base / "corpus" / MANIFEST).is_file():
        base = base / "corpus"
    folder = base / name / split
    if not (base / MANIFEST).is_file():
        raise FileNotFoundError(f"corpus not found at {base}; build it with `codebridge data corpus`")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: the corpus at {base} was built without the styles {name} needs; "
            "rebuild it with `codebridge data corpus` (all styles)"
        )
    return folder
