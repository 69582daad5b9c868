"""The run report: one self-contained HTML page per training run (``codebridge report RUN_DIR``)."""

from __future__ import annotations

from codebridge.report.build import build_report

__all__ = ["build_report"]
