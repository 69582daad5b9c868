import math
from pathlib import Path

import entmax
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from codebridge.config import BridgeConfig, ConfigError, load_config
from codebridge.models.bridges.base import BRIDGES
from codebridge.models.bridges.fdt import FdtBridge, FdtConfig, fdt_temperature
from codebridge.models.features import Features
from helpers import free_port

WIDTHS = {"image": 6, "text": 5, "audio": 4}
LENGTHS = {"image": 9, "text": 6, "audio": 7}


def _cfg(margin: float = 0.0, **fdt) -> BridgeConfig:
    fdt = {"num_tokens": 16, "dim": 8, "temperature": 2.0, "temperature_decay": 0.5, "temperature_every": 10} | fdt
    return BridgeConfig(name="fdt", margin=margin, sections={"fdt": FdtConfig(**fdt)})


def _bridge(cfg: BridgeConfig, modalities=("image", "text")) -> FdtBridge:
    torch.manual_seed(0)
    return BRIDGES.get("fdt")(cfg, {m: WIDTHS[m] for m in modalities}).double()


def _features(batch: int = 5, modalities=("image", "text"), seed: int = 1) -> dict[str, Features]:
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for m in modalities:
        tokens = torch.randn(batch, LENGTHS[m], WIDTHS[m], dtype=torch.float64, generator=g)
        lengths = (
            torch.randint(1, LENGTHS[m] + 1, (batch,), generator=g)
            if m != "image"
            else torch.full((batch,), LENGTHS[m])
        )
        mask = torch.arange(LENGTHS[m]) < lengths[:, None]
        feats[m] = Features(tokens, mask, tokens.mean(1))
    return feats


def reference_temperature(cfg: FdtConfig, step: int) -> float:
    exponent = step // cfg.temperature_every if cfg.temperature_staircase else step / cfg.temperature_every
    return max(cfg.temperature * cfg.temperature_decay**exponent, cfg.temperature_floor)


def reference_loss(bridge: FdtBridge, feats: dict[str, Features], step: int) -> torch.Tensor:
    """The FDT loss straight from the formulas (papers.md B1/B2), float64, loops over samples."""
    cfg = bridge.cfg.fdt
    temperature = reference_temperature(cfg, step)
    fdt = bridge.tokens
    embeddings = {}
    for m, f in feats.items():
        ln1, lin1, _, ln2, lin2 = bridge.query[m]
        x = F.layer_norm(f.tokens, (f.tokens.shape[-1],), ln1.weight, ln1.bias)
        x = F.layer_norm(F.gelu(F.linear(x, lin1.weight, lin1.bias)), (lin1.out_features,), ln2.weight, ln2.bias)
        q = F.linear(x, lin2.weight, lin2.bias)
        rows = []
        for b in range(q.shape[0]):
            valid = q[b, f.mask[b]] @ fdt.T / math.sqrt(cfg.dim) / temperature  # [T_b, C]
            padded = torch.zeros(int((~f.mask[b]).sum()), cfg.num_tokens, dtype=valid.dtype)
            pool_over = torch.cat([valid, padded]) if cfg.pad_mode == "zero" else valid
            if cfg.pooling == "max":
                rows.append(pool_over.max(0).values)
            elif cfg.pooling == "sum":
                rows.append(valid.sum(0))
            else:
                rows.append(pool_over.sum(0) / pool_over.shape[0])
        s = torch.stack(rows)
        if cfg.activation == "sparsemax":
            w = entmax.sparsemax(s, dim=-1)
            pooled = w @ fdt
        elif cfg.activation == "softmax":
            pooled = torch.softmax(s, -1) @ fdt
        else:
            w = torch.sigmoid(s)
            pooled = (w @ fdt) / w.sum(-1, keepdim=True)
        embeddings[m] = pooled / pooled.norm(dim=-1, keepdim=True)
    scale = bridge.logit_scale.log_scale.exp().clamp(max=bridge.cfg.max_logit_scale)
    names = sorted(embeddings)
    total = 0.0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sim = embeddings[a] @ embeddings[b].T - bridge.cfg.margin * torch.eye(len(embeddings[a]))
            for logits in (scale * sim, scale * sim.T):
                total = total - torch.log_softmax(logits, dim=1).diagonal().mean() / 2
    return total


CASES = [
    {},  # the paper's defaults: sparsemax, max, -inf padding, top-k sparsemax
    {"pad_mode": "zero", "chunk_size": 2, "topk_sparsemax": False},
    {"pooling": "mean", "chunk_size": 3, "sparsemax_k": 1},
    {"pooling": "mean", "pad_mode": "zero"},
    {"activation": "softmax", "pooling": "sum", "chunk_size": 4},
    {"activation": "sigmoid", "pad_mode": "zero", "chunk_size": 1, "temperature_staircase": False},
]


@pytest.mark.parametrize("fdt", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_loss_and_gradients_match_reference(fdt):
    modalities = ("audio", "image", "text")
    bridge = _bridge(_cfg(margin=0.1, **fdt), modalities)
    feats = _features(modalities=modalities)
    step = 25
    total, logs = bridge.loss(bridge(feats, step=step), step)
    expected = reference_loss(bridge, feats, step)
    assert torch.allclose(total, expected, atol=1e-10)
    assert logs["fdt/temperature"] == reference_temperature(bridge.cfg.fdt, step)
    assert sorted(logs) == [
        "fdt/active",
        "fdt/temperature",
        "fdt/token_norm",
        "logit_scale",
        "loss/contrastive/audio-image",
        "loss/contrastive/audio-text",
        "loss/contrastive/image-text",
    ]
    params = [p for p in bridge.parameters() if p.requires_grad]
    got = torch.autograd.grad(total, params)
    want = torch.autograd.grad(expected, params)
    for name, a, b in zip([n for n, _ in bridge.named_parameters()], got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-9), name


def test_outputs_and_extras():
    bridge = _bridge(_cfg())
    feats = _features()
    out = bridge(feats, step=0, token_scores=True)
    for m, f in feats.items():
        w = out[m].extras["weights"]
        assert w.shape == (5, 16) and (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(5, dtype=w.dtype))
        assert torch.allclose(out[m].embedding.norm(dim=-1), torch.ones(5, dtype=w.dtype))
        scores = out[m].extras["token_scores"]
        assert scores.shape == (5, LENGTHS[m], 16)
        assert (scores[~f.mask] == float("-inf")).all() and scores[f.mask].isfinite().all()
        assert torch.equal(scores, bridge.token_fdt_scores(feats)[m])
    assert "token_scores" not in bridge(feats)["text"].extras
    _, logs = bridge.loss(out)
    active = [(out[m].extras["weights"] > 0).sum(-1).double().mean() for m in out]
    assert math.isclose(logs["fdt/active"], torch.stack(active).mean().item(), rel_tol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "mean", "sum"])
@pytest.mark.parametrize("chunk_size", [0, 2])
def test_padding_never_changes_a_result(pooling, chunk_size):
    bridge = _bridge(_cfg(pooling=pooling, chunk_size=chunk_size))
    feats = _features()
    text = feats["text"]
    g = torch.Generator().manual_seed(3)
    garbage = 100 * torch.randn(5, LENGTHS["text"] + 4, WIDTHS["text"], dtype=torch.float64, generator=g)
    mask = torch.cat([text.mask, torch.zeros(5, 4, dtype=torch.bool)], dim=1)
    tokens = torch.where(mask[..., None], F.pad(text.tokens, (0, 0, 0, 4)), garbage)
    padded = dict(feats, text=Features(tokens, mask, text.summary))
    before, after = bridge(feats, step=0), bridge(padded, step=0)
    for m in feats:
        assert torch.allclose(before[m].embedding, after[m].embedding, atol=1e-12)
        assert torch.allclose(before[m].extras["weights"], after[m].extras["weights"], atol=1e-12)


def test_temperature_schedule():
    paper = FdtConfig(temperature=1000.0, temperature_decay=0.3, temperature_every=2700, temperature_floor=0.01)
    assert fdt_temperature(paper, 0) == 1000.0
    assert fdt_temperature(paper, 2699) == 1000.0  # staircase: the solver updates T only at multiples of 2700
    assert math.isclose(fdt_temperature(paper, 2700), 1000.0 * 0.3)
    assert math.isclose(fdt_temperature(paper, 5400 + 5), 1000.0 * 0.3**2)
    assert fdt_temperature(paper, 2700 * 20) == 0.01  # 1000 * 0.3**20 is below the floor
    smooth = FdtConfig(temperature=1000.0, temperature_decay=0.3, temperature_every=2700, temperature_staircase=False)
    assert math.isclose(fdt_temperature(smooth, 1350), 1000.0 * 0.3**0.5)
    released = FdtConfig()  # the released config: decay 1, so T stays at 1000
    assert fdt_temperature(released, 86560) == 1000.0


def test_eval_uses_the_stored_training_step():
    cfg = _cfg()
    bridge = _bridge(cfg)
    feats = _features()
    trained = bridge(feats, step=25)["text"].embedding
    state = bridge.state_dict()
    assert int(state["step"]) == 25
    loaded = FdtBridge(cfg, {"image": 6, "text": 5}).double()
    loaded.load_state_dict(state)
    loaded.eval()
    assert loaded.temperature() == fdt_temperature(cfg.fdt, 25)
    assert torch.allclose(loaded(feats)["text"].embedding, trained, atol=1e-12)
    assert not torch.allclose(loaded(feats, step=0)["text"].embedding, trained, atol=1e-6)  # T(0) differs
    assert int(loaded.step) == 25  # an explicit step in eval mode is not stored


def test_weight_decay_of_the_token_table():
    names = dict(_bridge(_cfg()).named_parameters())
    assert "tokens" in names and "logit_scale.log_scale" in names
    assert _bridge(_cfg()).no_weight_decay() == {"logit_scale.log_scale"}  # the authors decay the table
    assert _bridge(_cfg(token_weight_decay=False)).no_weight_decay() == {"logit_scale.log_scale", "tokens"}


def test_usage_counts_training_forwards_only():
    bridge = _bridge(_cfg(temperature=0.05))
    batches = [_features(seed=s) for s in (1, 2)]
    weights = {"image": [], "text": []}
    for feats in batches:
        for m, out in bridge(feats, step=0).items():
            weights[m].append(out.extras["weights"])
    bridge.eval()(_features(seed=3))  # an evaluation in between is not counted
    stats = bridge.usage()
    for m, ws in weights.items():
        w = torch.cat(ws)
        assert math.isclose(stats[f"fdt/{m}/used"], (w > 0).any(0).double().mean().item())
        assert math.isclose(stats[f"fdt/{m}/active"], (w > 0).sum(-1).double().mean().item())
    same_top = torch.cat(weights["image"]).argmax(-1) == torch.cat(weights["text"]).argmax(-1)
    assert math.isclose(stats["fdt/agree/image-text"], same_top.double().mean().item())
    assert bridge.usage() == {}  # counters restart after every call


def test_bad_config_and_inputs_are_reported():
    for field, value in (("num_tokens", 0), ("chunk_size", -1), ("temperature", 0.0), ("query_hidden", 0)):
        with pytest.raises(ConfigError, match=rf"^model\.bridge\.fdt\.{field}: {value} is out of range"):
            load_config(overrides=["model.bridge.name=fdt", f"model.bridge.fdt.{field}={value}"])
    bridge = _bridge(_cfg())
    feats = _features()
    with pytest.raises(KeyError, match="built for"):
        bridge({"video": feats["text"]})
    empty = Features(feats["text"].tokens, torch.zeros_like(feats["text"].mask), feats["text"].summary)
    with pytest.raises(ValueError, match="no real token"):
        bridge({"text": empty})


# ---------------------------------------------------------------------------------------------------------------
# Two gloo processes with half the batch each train exactly like one process with the whole batch.
# ---------------------------------------------------------------------------------------------------------------
DIST_CFG = {"chunk_size": 2, "sparsemax_k": 2, "pooling": "max"}
MODALITIES = ("audio", "image", "text")


def _loss_and_grads(feats: dict[str, Features]) -> tuple[torch.Tensor, FdtBridge, dict[str, torch.Tensor]]:
    bridge = _bridge(_cfg(**DIST_CFG), MODALITIES)
    inputs = {m: f.tokens.clone().requires_grad_() for m, f in feats.items()}
    out = bridge({m: Features(inputs[m], f.mask, f.summary) for m, f in feats.items()}, step=12)
    loss, _ = bridge.loss(out)
    loss.backward()
    return loss.detach(), bridge, inputs


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full = _features(batch=6, modalities=MODALITIES)
        rows = slice(rank * 3, rank * 3 + 3)
        loss, bridge, inputs = _loss_and_grads(
            {m: Features(f.tokens[rows], f.mask[rows], f.summary[rows]) for m, f in full.items()}
        )
        dist.all_reduce(loss)
        grads = {}
        for name, p in bridge.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
        result = {"loss": loss / world, "grads": grads, "inputs": {m: x.grad / world for m, x in inputs.items()}}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    loss, bridge, inputs = _loss_and_grads(_features(batch=6, modalities=MODALITIES))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.allclose(ranks[0]["loss"], loss, atol=1e-5)
    for name, p in bridge.named_parameters():
        for r in ranks:
            assert torch.allclose(r["grads"][name], p.grad, atol=1e-5), name
    for m, x in inputs.items():
        assert torch.allclose(torch.cat([r["inputs"][m] for r in ranks]), x.grad, atol=1e-5), m


@pytest.mark.parametrize("activation", ["sparsemax", "softmax", "sigmoid"])
@pytest.mark.parametrize("topk", [True, False])
def test_position_weights_are_the_forward_activation(activation, topk):
    """The discrete space's per-position weights are the bridge's own activation at its stored temperature: on a
    one-position input they equal the weights ``forward`` pools, whatever the activation and sparsemax variant."""
    bridge = _bridge(_cfg(activation=activation, topk_sparsemax=topk, sparsemax_k=1, temperature=0.3)).eval()
    bridge.step.fill_(25)  # a decayed temperature: the weights must use it too
    single = {m: Features(f.tokens[:, :1], f.mask[:, :1] | True, f.summary) for m, f in _features().items()}
    space = bridge.discrete_space()
    with torch.no_grad():
        for m, out in bridge(single).items():
            torch.testing.assert_close(space.weights(m, single[m])[:, 0], out.extras["weights"], rtol=0, atol=1e-12)
            assert torch.equal(space.assignments(m, single[m])[:, 0], out.extras["weights"].argmax(-1))
