from pathlib import Path

import pytest

from codebridge.config import load_config

RECIPES = sorted((Path(__file__).parents[1] / "configs").glob("emoji-*.yaml"))


def test_recipes_exist_for_every_bridge_and_task():
    names = {p.stem for p in RECIPES}
    for bridge in ("clip", "codebook", "fdt"):
        for task in ("", "-speech", "-video", "-trimodal"):
            assert f"emoji-{bridge}{task}" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(path):
    cfg = load_config(path)
    if not path.stem.endswith("base"):
        assert cfg.model.bridge.name in path.stem
        assert len(cfg.data.modalities) >= 2
