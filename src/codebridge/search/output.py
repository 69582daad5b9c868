"""Hits as a terminal table (``codebridge search``); ``--json`` prints them unchanged."""

from __future__ import annotations

from typing import Any

COLUMNS = (("rank", 4), ("score", 8), ("id", 6), ("source", 28), ("caption", 40))


def _cell(value: Any, width: int) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(hits: list[dict[str, Any]]) -> str:
    """One line per hit; with ``matched`` codes (``--explain``) an indented line lists them with their words."""
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()]
    for hit in hits:
        lines.append("  ".join(_cell(hit.get(name, ""), width).ljust(width) for name, width in COLUMNS).rstrip())
        for code in hit.get("matched", []):
            words = ", ".join(code.get("words", [])) or "-"
            lines.append(f"      code {code['code']} ({code['score']:.3f}): {words}")
    if not hits:
        lines.append("(no results)")
    return "\n".join(lines)
