"""Run folders and model folders written before configs moved beside their components still load, unchanged.

tests/data/legacy was written by commit d60c855 (configs all in config.py, one Sample attribute per modality):
``config.yaml`` (save_config of a small four-modality FDT config), ``model/`` (CodeBridgeModel.save of it, seed 0),
``model/params.json`` (shape and sum of |values| of every tensor of that model built with torch.manual_seed(0)) and
``model/embeddings.json`` (its embeddings of one fixed input per modality).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from codebridge.config import LEGACY_CACHE_MB, DataConfig, load_config, to_dict
from codebridge.data.preprocess import Preprocessors
from codebridge.models.model import CodeBridgeModel

LEGACY = Path(__file__).parent / "data" / "legacy"


def fixed_inputs() -> dict[str, object]:
    """The inputs embeddings.json was computed from."""
    return {
        "image": (np.arange(20 * 24 * 3) % 251).astype(np.uint8).reshape(20, 24, 3),
        "text": "a red emoji",
        "audio": torch.sin(torch.arange(4000) / 7.0),
        "video": (np.arange(4 * 16 * 16 * 3) % 253).astype(np.uint8).reshape(4, 16, 16, 3),
    }


def test_an_old_run_config_loads_to_the_same_values() -> None:
    old = yaml.safe_load((LEGACY / "config.yaml").read_text())
    new = to_dict(load_config(LEGACY / "config.yaml"))
    assert old["data"]["cache"] is True and new["data"]["cache_mb"] == LEGACY_CACHE_MB  # renamed since: upgraded
    old["data"] = DataConfig.upgrade(old["data"])
    for section in ("prep", "model", "train", "eval", "data"):  # fields added since get their defaults
        assert known_keys(new[section], old[section]) == old[section], section


def known_keys(new: object, old: object) -> object:
    """``new`` restricted to the keys ``old`` has, at every depth (fields added to nested sections are left out)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: known_keys(new[k], old[k]) if k in new else "<missing>" for k in old}
    return new


def test_an_old_model_folder_loads_and_embeds_exactly_as_before() -> None:
    model = CodeBridgeModel.load(LEGACY / "model")
    expected = json.loads((LEGACY / "model" / "embeddings.json").read_text())
    for modality, item in fixed_inputs().items():
        got = model.encode(modality, [item])[0]
        torch.testing.assert_close(got, torch.tensor(expected[modality]), atol=1e-5, rtol=1e-4)


def test_an_old_config_builds_the_same_model() -> None:
    loaded = CodeBridgeModel.load(LEGACY / "model")
    torch.manual_seed(0)
    model = CodeBridgeModel(loaded.cfg, loaded.modalities, Preprocessors(loaded.cfg.prep, loaded.tokenizer))
    expected = json.loads((LEGACY / "model" / "params.json").read_text())
    got = {k: [list(v.shape), float(v.double().abs().sum())] for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    for name, (shape, total) in expected.items():
        assert got[name][0] == shape, name
        assert got[name][1] == pytest.approx(total, abs=1e-3), name
