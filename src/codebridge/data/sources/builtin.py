"""Built-in suites (``emoji-style:test``...): delegated to the emoji benchmark, imported only when asked for."""

from __future__ import annotations

from codebridge.config import DataConfig
from codebridge.data.sample import Sample
from codebridge.data.sources.spec import SOURCES, Problems


@SOURCES.register("builtin")
def read_builtin(spec: str, data: DataConfig, problems: Problems) -> list[Sample]:
    from codebridge.data.emoji.suites import load_suite

    name, _, split = spec.partition(":")
    return load_suite(name, split or "train", data.root)
