"""The bridge extension point: a toy bridge defined in this file only trains, saves, loads, evaluates and reports
without touching a library file; and every registered bridge (built-in and the toy) keeps the same contract."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codebridge
from codebridge.config import BridgeConfig, ConfigError, load_config
from codebridge.data.preprocess import Preprocessors, Tokenizer
from codebridge.eval.localization import position_similarity
from codebridge.eval.run import evaluate_model
from codebridge.models.bridges import bridge_class, bridge_names
from codebridge.models.bridges.base import BRIDGES, Bridge, DiscreteSpace, detached, pairwise_contrastive
from codebridge.models.features import BridgeOutput, Features
from codebridge.models.model import CodeBridgeModel, prepare_batch
from codebridge.report import build_report
from codebridge.train import train
from helpers import small_bridge_config
from test_localization import CAPTIONS, random_image
from test_report import make_run

torch.set_num_threads(1)
TOY_CODES, TOY_TOP = 8, 2


# ------------------------------------------------------------------------------------------------ the toy bridge
@BRIDGES.register("toy")
class ToyBridge(Bridge):
    """Retrieval: InfoNCE on linearly projected summaries. Codes: every position, projected like its summary, is
    compared with a fixed random table of code vectors; its top-2 codes share its weight."""

    def __init__(self, cfg: BridgeConfig, widths: dict[str, int]) -> None:
        super().__init__(cfg, widths)
        self.proj = nn.ModuleDict({m: nn.Linear(w, cfg.embed_dim, bias=False) for m, w in widths.items()})
        table = torch.randn(TOY_CODES, cfg.embed_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("table", F.normalize(table, dim=-1))  # fixed: saved with the model, never trained
        self._used: dict[str, torch.Tensor] = {}

    def forward(self, features: dict[str, Features], step: int = 0) -> dict[str, BridgeOutput]:
        if self.training:  # usage describes training batches only
            for m, f in features.items():
                codes = self.discrete_space().assignments(m, f)
                seen = torch.bincount(codes[codes >= 0], minlength=TOY_CODES) > 0
                self._used[m] = seen | self._used.get(m, False)
        return {m: BridgeOutput(F.normalize(self.proj[m](f.summary), dim=-1)) for m, f in features.items()}

    def loss(self, outputs: dict[str, BridgeOutput], step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scale = self.logit_scale()
        embeddings = {m: out.embedding for m, out in outputs.items()}
        total, parts = pairwise_contrastive(embeddings, scale, self.cfg.margin, prefix="loss/contrastive")
        return total, detached(parts | {"logit_scale": scale})

    @classmethod
    def describe(cls, cfg: BridgeConfig) -> str:
        return f"toy: {TOY_CODES} fixed random codes, top-{TOY_TOP} per position, embedding dim {cfg.embed_dim}"

    def _scores(self, m: str, f: Features) -> torch.Tensor:
        cosine = F.normalize(self.proj[m](f.tokens), dim=-1) @ self.table.T
        return cosine.masked_fill(~f.mask.bool().unsqueeze(-1), 0.0)

    def _weights(self, m: str, f: Features) -> torch.Tensor:
        top = self._scores(m, f).topk(TOY_TOP, dim=-1)
        weights = torch.zeros(*top.values.shape[:2], TOY_CODES).scatter(-1, top.indices, top.values.softmax(-1))
        return weights.masked_fill(~f.mask.bool().unsqueeze(-1), 0.0)

    def discrete_space(self) -> DiscreteSpace:
        return DiscreteSpace(
            unit="code",
            vectors=self.table,
            scores=self._scores,
            weights=self._weights,
            mass=lambda m, f: self._weights(m, f).sum(1),
            mass_unit="top-2 weight mass",
        )

    def affinity(self, query: str, q: Features, target: str, t: Features) -> torch.Tensor:
        """How much code weight a query position shares with each target position."""
        return self._weights(query, q) @ self._weights(target, t).transpose(1, 2)

    def usage(self) -> dict[str, float]:
        used, self._used = self._used, {}
        return {f"toy/used/{m}": seen.float().mean().item() for m, seen in used.items()}


NAMES = bridge_names()  # the built-in bridges and the toy
WIDTHS = {"image": 6, "text": 5}


def features(seed: int, lengths: dict[str, int] | None = None, pad: int = 0) -> dict[str, Features]:
    """Random features; text has ragged lengths, and ``pad`` extra padded positions of garbage on every input."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or {"image": 4, "text": 6}
    out = {}
    for m, width in WIDTHS.items():
        real = lengths[m]
        tokens = torch.randn(3, real + pad, width, generator=g)
        mask = torch.zeros(3, real + pad, dtype=torch.bool)
        mask[:, :real] = True
        if m == "text":
            mask[1, real - 2 :] = False  # a shorter caption
        tokens[~mask] = 1e3  # garbage that must never matter
        out[m] = Features(tokens, mask, torch.randn(3, width, generator=g))
    return out


def make_bridge(name: str) -> Bridge:
    torch.manual_seed(0)
    return bridge_class(name)(small_bridge_config(name).model.bridge, WIDTHS)


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("name", NAMES)
def test_describe_is_one_line_of_its_own(name: str) -> None:
    cfg = small_bridge_config(name).model.bridge
    line = bridge_class(name).describe(cfg)
    assert isinstance(line, str) and line.startswith(f"{name}:") and "\n" not in line
    assert Bridge.describe(BridgeConfig(name=name)).startswith(f"{name}: Bridge")  # the default names the bridge


@pytest.mark.parametrize("name", NAMES)
def test_loss_parts_are_detached_tensors(name: str) -> None:
    bridge = make_bridge(name).train()
    total, parts = bridge.loss(bridge(features(1), step=1), 1)
    assert total.ndim == 0 and total.requires_grad
    assert parts and all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in parts.values())


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_discrete_space_and_affinity_shapes(name: str) -> None:
    bridge = make_bridge(name).eval()
    feats = features(1)
    space = bridge.discrete_space()
    if space is not None:
        assert isinstance(space, DiscreteSpace) and space.unit and space.mass_unit
        assert space.vectors.ndim == 2 and space.size == space.vectors.shape[0]
        for m, f in feats.items():
            padded = ~f.mask
            scores, weights = space.scores(m, f), space.weights(m, f)
            assert scores.shape == weights.shape == (*f.mask.shape, space.size)
            assert (scores[padded] == 0).all() and (weights[padded] == 0).all() and (weights >= 0).all()
            codes = space.assignments(m, f)
            assert codes.dtype == torch.long and (codes[padded] == -1).all()
            assert ((codes[f.mask] >= 0) & (codes[f.mask] < space.size)).all()
            mass = space.mass(m, f)
            assert mass.shape == (3, space.size) and (mass >= 0).all()
    sim = bridge.affinity("text", feats["text"], "image", feats["image"])
    if sim is not None:
        assert sim.shape == (3, 6, 4) and sim[feats["text"].mask].isfinite().all()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_padding_changes_no_result(name: str) -> None:
    bridge = make_bridge(name).eval()
    short, long = features(2), features(2, pad=3)
    for m in WIDTHS:  # the same real positions, with three padded ones of garbage after them
        long[m].tokens[:, : short[m].mask.shape[1]] = short[m].tokens
        long[m].summary.copy_(short[m].summary)
    out_short, out_long = bridge(short), bridge(long)
    for m, f in short.items():
        torch.testing.assert_close(out_short[m].embedding, out_long[m].embedding)
        space = bridge.discrete_space()
        if space is not None:
            t = f.mask.shape[1]
            torch.testing.assert_close(space.scores(m, f), space.scores(m, long[m])[:, :t])
            torch.testing.assert_close(space.weights(m, f), space.weights(m, long[m])[:, :t])
            torch.testing.assert_close(space.mass(m, f), space.mass(m, long[m]))
    sim_short = bridge.affinity("text", short["text"], "image", short["image"])
    if sim_short is not None:
        sim_long = bridge.affinity("text", long["text"], "image", long["image"])[:, :6, :4]
        valid = short["text"].mask
        torch.testing.assert_close(sim_short[valid], sim_long[valid])


@pytest.mark.parametrize("name", NAMES)
def test_usage_counts_training_forwards_only(name: str) -> None:
    bridge = make_bridge(name).train()
    twin = copy.deepcopy(bridge)
    bridge(features(1), step=1)
    twin(features(1), step=1)
    twin.eval()(features(7, lengths={"image": 4, "text": 3}))  # an in-training evaluation on other data
    assert twin.train().usage() == bridge.usage()
    for stats in (twin.usage(), bridge.usage()):
        assert stats == {}  # reset by the call
    bridge.eval()(features(3))
    assert bridge.usage() == {}
    bridge.train()(features(3), step=2)
    stats = bridge.usage()
    assert all(isinstance(k, str) and isinstance(v, float) and math.isfinite(v) for k, v in stats.items())
    assert bool(stats) == (bridge.discrete_space() is not None)  # every discrete bridge here reports usage


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_the_space_changes_no_state(name: str) -> None:
    bridge = make_bridge(name).train()
    space = bridge.discrete_space()
    if space is None:
        pytest.skip(f"the {name} bridge has no discrete space")
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    for m, f in features(4).items():
        space.scores(m, f), space.weights(m, f), space.mass(m, f)
    bridge.affinity("text", features(4)["text"], "image", features(4)["image"])
    assert all(torch.equal(before[k], v) for k, v in bridge.state_dict().items())
    assert bridge.usage() == {}


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    cfg = small_bridge_config(name)
    torch.manual_seed(0)
    model = CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text)))
    images = [random_image(seed=i) for i in range(3)]
    batch = {"image": prepare_batch(model.preprocessors, "image", images)}
    batch["text"] = prepare_batch(model.preprocessors, "text", CAPTIONS)
    model.train()(batch, step=3)  # moves training state (EMA codebook, FDT step) away from its initial value
    loaded = codebridge.load(model.save(tmp_path / "model"))
    assert type(loaded.bridge) is type(model.bridge)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    torch.testing.assert_close(loaded.encode("text", CAPTIONS), model.encode("text", CAPTIONS), rtol=0, atol=0)
    with torch.no_grad():
        text, image = (loaded.features(m, batch[m]) for m in ("text", "image"))
        sim = loaded.bridge.affinity("text", text, "image", image)
        if sim is not None:
            torch.testing.assert_close(sim, model.bridge.affinity("text", text, "image", image), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_report_renders(name: str, tmp_path: Path) -> None:
    run, _ = make_run(tmp_path, bridge=name, analysis=False)
    page = build_report(run, queries=1).read_text()
    cfg = load_config(run / "config.yaml").model.bridge
    assert bridge_class(name).describe(cfg).replace("&", "&amp;") in page
    assert '<section id="usage">' in page
    space = codebridge.load(run / "model").bridge.discrete_space()
    if space is not None:
        assert f"share of {space.mass_unit} per code" in page  # the usage histogram of the model's own space
    else:
        assert f"The {name} bridge has no shared discrete space" in page


# ------------------------------------------------------------------------------------------------ errors
def test_an_unknown_bridge_is_named_with_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"model\.bridge\.name: 'vq' is not allowed; expected one of .*'toy'"):
        load_config(None, ["model.bridge.name=vq"])
    cfg = small_bridge_config("vq")
    with pytest.raises(ConfigError, match=r"model\.bridge\.name: 'vq'.*'clip', 'codebook', 'fdt'"):
        CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text)))


def test_a_bridge_without_affinity_or_codes_says_so() -> None:
    cfg = small_bridge_config("clip")
    model = CodeBridgeModel(cfg, ["image", "text"], Preprocessors(cfg.prep, Tokenizer.train(CAPTIONS, cfg.prep.text)))
    model.bridge.affinity = lambda *args: None  # as a bridge that does not override Bridge.affinity
    feats = features(1)
    with pytest.raises(ConfigError, match=r"clip bridge has no position affinity.*--method windows"):
        position_similarity(model, "text", feats["text"], "image", feats["image"])
    from codebridge.eval.localization import code_affinity

    with pytest.raises(ConfigError, match="clip bridge has no codes or tokens"):
        code_affinity(model, "text", feats["text"])


# ------------------------------------------------------------------------------------------------ end to end
def test_a_bridge_defined_here_trains_saves_loads_evaluates_and_reports(emoji_root: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.train=emoji-scenes:train",
            "data.val=emoji-scenes:test",
            f"data.root={emoji_root}",
            f"output_dir={tmp_path / 'run'}",
            "prep.image={size: 16, augment: false}",
            "prep.text={context_length: 24, vocab_size: 300}",
            "model.image={patch_size: 4, width: 16, depth: 1, heads: 2}",
            "model.text={width: 16, depth: 1, heads: 2}",
            "model.bridge={name: toy, embed_dim: 8}",
            "train={batch_size: 8, steps: 4, warmup_steps: 1, log_every: 2, progress: false}",
        ],
    )
    run = train(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    usage = [r["usage"] for r in records if r["kind"] == "train"]
    assert len(usage) == 2 and set(usage[0]) == {"toy/used/image", "toy/used/text"}
    assert all(0 < v <= 1 for u in usage for v in u.values())

    model = codebridge.load(run / "model")
    assert isinstance(model.bridge, ToyBridge)
    retrieval = evaluate_model(model, "emoji-scenes:test", "retrieval", batch_size=16)
    assert 0 <= retrieval["text_to_image_R@1"] <= 1
    codes = evaluate_model(model, "emoji-scenes:test", "codes", batch_size=16, artifacts=tmp_path / "analysis")
    assert 1 <= codes["codes_used"] <= TOY_CODES and 0 <= codes["codes_purity_concept"] <= 1
    table = json.loads((tmp_path / "analysis" / "codes.json").read_text())
    assert len(table["usage"]) == TOY_CODES
    pointing = evaluate_model(model, "emoji-scenes:test", "localization", batch_size=16)
    assert pointing["n_objects"] > 0 and 0 <= pointing["pointing_game"] <= 1

    page = build_report(run, queries=1).read_text()
    assert ToyBridge.describe(model.cfg.model.bridge) in page
    assert "share of top-2 weight mass per code" in page  # the toy's usage on the validation data
    assert "code usage: used" in page  # its usage logged during training, as its own panel
    counts = np.asarray(table["usage"])
    assert counts.sum() == codes["codes_positions"]
