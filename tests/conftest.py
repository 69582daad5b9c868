"""Shared fixtures. ``emoji_root``: a small real emoji benchmark, built once per test session.

The npm tarballs are cached under $CODEBRIDGE_HOME/npm (default ~/.cache/codebridge/npm), so only the first
session on a machine downloads them; the build itself takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# 40 concepts spread over every group (with skin-tone variants), all 8 voices, 40 scenes, 20 clips (every motion).
EMOJI_SUBSET = {"limit": 40, "n_scenes": 40, "n_clips": 20}


@pytest.fixture(scope="session")
def emoji_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a built emoji subset; pass it as ``root=`` to ``load_suite``/``class_names`` or as ``data.root``."""
    from codebridge.data.emoji.build import build_emoji

    root = tmp_path_factory.mktemp("emoji")
    build_emoji(root, **EMOJI_SUBSET, workers=2, progress=False)
    return root
