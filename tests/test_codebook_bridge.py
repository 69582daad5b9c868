import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codebridge.config import BridgeConfig, ConfigError, load_config
from codebridge.models.bridges.base import BRIDGES
from codebridge.models.bridges.codebook import CodebookBridge, CodebookConfig, dominant_codes
from codebridge.models.features import Features
from helpers import free_port

WIDTHS = {"audio": 7, "image": 6, "text": 5}
LENGTHS = {"audio": 6, "image": 4, "text": 5}
K, CODE_DIM, EMBED = 8, 4, 3


def features(modalities, batch: int = 4, seed: int = 0, aligned: bool = False) -> dict[str, Features]:
    """Random float64 features; ragged masks (position 0 always real) unless ``aligned`` (same T and mask)."""
    g = torch.Generator().manual_seed(seed)
    shared_mask = torch.rand(batch, 5, generator=g) > 0.3
    out = {}
    for m in modalities:
        t = 5 if aligned else LENGTHS[m]
        mask = shared_mask.clone() if aligned else torch.rand(batch, t, generator=g) > 0.3
        mask[:, 0] = True
        tokens = torch.randn(batch, t, WIDTHS[m], generator=g, dtype=torch.float64)
        out[m] = Features(tokens, mask, torch.randn(batch, WIDTHS[m], generator=g, dtype=torch.float64))
    return out


def make_bridge(modalities, embed_dim: int = EMBED, **codebook) -> CodebookBridge:
    torch.manual_seed(0)
    options = {"size": K, "dim": CODE_DIM, "dead_code_threshold": 0, **codebook}
    cfg = BridgeConfig(name="codebook", embed_dim=embed_dim, sections={"codebook": CodebookConfig(**options)})
    model = CodebookBridge(cfg, {m: WIDTHS[m] for m in modalities}).double()
    with torch.no_grad():  # codes at the scale of the projected tokens, so that several are used
        model.codebook.embed.normal_(std=0.5)
        model.codebook.embed_sum.copy_(model.codebook.embed)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Float64 references, straight from the formulas (papers.md A2.3), loops over samples and positions.
# ---------------------------------------------------------------------------------------------------------------
def reference_p(model: CodebookBridge, f: Features, m: str, embed: torch.Tensor) -> torch.Tensor:
    """P[i] = mean over real positions t of softmax_k(-||h_t - e_k||_2), h = token projection."""
    proj = model.token_proj[m]
    rows = []
    for i in range(len(f.tokens)):
        ps = []
        for t in range(f.tokens.shape[1]):
            if f.mask[i, t]:
                h = f.tokens[i, t] @ proj.weight.detach().T + proj.bias.detach()
                d = torch.stack([(h - e).pow(2).sum().sqrt() for e in embed])
                ps.append(torch.exp(-d) / torch.exp(-d).sum())
        rows.append(torch.stack(ps).mean(0))
    return torch.stack(rows)


def reference_cmcm(pa: torch.Tensor, pb: torch.Tensor, margin: float, symmetric: bool) -> float:
    def score(x, y):  # sum_k x log y + y log x, log(. + 1e-10)
        return float(sum(x[k] * math.log(y[k] + 1e-10) + y[k] * math.log(x[k] + 1e-10) for k in range(len(x))))

    def rows(p, q):
        n = len(p)
        total = 0.0
        for i in range(n):
            logits = [score(p[i], q[j]) - (margin if j == i else 0.0) for j in range(n)]
            total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
        return total / n

    return (rows(pa, pb) + rows(pb, pa)) / 2 if symmetric else rows(pa, pb)


def test_registered_as_codebook():
    assert BRIDGES.get("codebook") is CodebookBridge


@pytest.mark.parametrize("modalities", [["image", "text"], ["audio", "image", "text"]])
@pytest.mark.parametrize(("margin", "symmetric"), [(0.0, False), (0.2, True)])
def test_cmcm_matches_float64_reference(modalities, margin, symmetric):
    model = make_bridge(modalities, cmcm_margin=margin, cmcm_symmetric=symmetric)
    feats = features(modalities)
    embed = model.codebook.embed.clone()  # before the training-mode EMA update in forward
    out = model.train()(feats)
    _, logs = model.loss(out)
    p = {m: reference_p(model, feats[m], m, embed) for m in modalities}
    for m in modalities:
        assert torch.allclose(out[m].extras["code_probs"], p[m], atol=1e-10)
    expected = {}
    for i, a in enumerate(modalities):  # sorted: the first of each pair gives the rows
        for b in modalities[i + 1 :]:
            expected[f"loss/cmcm/{a}-{b}"] = reference_cmcm(p[a], p[b], margin, symmetric)
    assert {k for k in logs if k.startswith("loss/cmcm/")} == set(expected)
    for name, value in expected.items():
        assert math.isclose(logs[name], value, rel_tol=1e-9), name
    assert math.isclose(logs["loss/cmcm"], sum(expected.values()), rel_tol=1e-9)


def test_total_loss_combines_the_weighted_parts():
    weights = {"summary_weight": 0.7, "discrete_summary_weight": 0.3, "cmcm_weight": 0.5, "commitment_weight": 0.4}
    model = make_bridge(["audio", "image", "text"], **weights)
    feats = features(["audio", "image", "text"])
    total, logs = model.loss(model(feats))
    expected = 0.7 * logs["loss/summary"] + 0.3 * logs["loss/discrete"] + 0.5 * logs["loss/cmcm"]
    assert math.isclose(total.item(), expected + logs["loss/commitment"], rel_tol=1e-9)
    assert math.isclose(logs["logit_scale"], 1 / 0.07, rel_tol=1e-6)
    assert logs["loss/commitment"] > 0
    for prefix in ("summary", "discrete", "cmcm"):
        parts = [v for k, v in logs.items() if k.startswith(f"loss/{prefix}/")]
        assert len(parts) == 3 and math.isclose(sum(parts), logs[f"loss/{prefix}"], rel_tol=1e-9)


def test_embedding_halves_and_extras():
    model = make_bridge(["image", "text"]).eval()
    feats = features(["image", "text"])
    out = model(feats)
    for m, o in out.items():
        f, x = feats[m], o.extras
        cont = f.summary @ model.summary_proj[m].weight.T
        assert torch.allclose(x["continuous"], cont / cont.norm(dim=-1, keepdim=True))
        codes = x["codes"]
        assert codes.shape == f.mask.shape and torch.equal(codes < 0, ~f.mask)
        pooled = torch.stack([model.codebook.embed[c[c >= 0]].mean(0) for c in codes])  # mean of the chosen codes
        disc = pooled @ model.discrete_proj.weight.T
        assert torch.allclose(x["discrete"], disc / disc.norm(dim=-1, keepdim=True))
        assert torch.equal(x["token_mask"], f.mask) and x["code_probs"].shape == (4, K)
        assert torch.allclose(x["code_probs"].sum(-1), torch.ones(4, dtype=torch.float64))
        assert o.embedding.shape == (4, 2 * EMBED)


def test_fusion_embedding_dot_is_cont_plus_lambda_disc():
    model = make_bridge(["image", "text"], fusion_lambda=0.3).eval()
    out = model(features(["image", "text"]))
    a, b = out["image"], out["text"]
    s_cont = a.extras["continuous"] @ b.extras["continuous"].T
    s_disc = a.extras["discrete"] @ b.extras["discrete"].T
    assert torch.allclose(a.embedding @ b.embedding.T, s_cont + 0.3 * s_disc, atol=1e-12)


def test_padding_with_garbage_changes_nothing():
    modalities = ["audio", "image", "text"]
    results = []
    for pad in (0, 3):
        model = make_bridge(modalities).train()
        feats = features(modalities)
        inputs = {}
        for m, f in feats.items():
            garbage = 1e4 * torch.randn(4, pad, WIDTHS[m], dtype=torch.float64)
            tokens = torch.cat([f.tokens, garbage], dim=1).requires_grad_()
            mask = torch.cat([f.mask, torch.zeros(4, pad, dtype=torch.bool)], dim=1)
            inputs[m] = Features(tokens, mask, f.summary)
        out = model(inputs)
        loss, _ = model.loss(out)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        token_grads = {m: f.tokens.grad[:, : LENGTHS[m]] for m, f in inputs.items()}
        results.append((loss, out, grads, token_grads, [b.clone() for b in model.codebook.buffers()]))
    (loss0, out0, g0, t0, b0), (loss1, out1, g1, t1, b1) = results
    assert torch.allclose(loss0, loss1, atol=1e-12)
    for m in modalities:
        n = LENGTHS[m]
        assert torch.equal(out0[m].extras["codes"], out1[m].extras["codes"][:, :n])
        assert torch.allclose(out0[m].extras["code_probs"], out1[m].extras["code_probs"], atol=1e-12)
        assert torch.allclose(out0[m].embedding, out1[m].embedding, atol=1e-12)
        assert torch.allclose(t0[m], t1[m], atol=1e-12)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-10) for n in g0)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(b0, b1, strict=True))


def test_cmcm_gradient_reaches_token_projections_not_the_codebook():
    model = make_bridge(["image", "text"], summary_weight=0.0, discrete_summary_weight=0.0, commitment_weight=0.0)
    loss, _ = model.loss(model(features(["image", "text"])))
    loss.backward()
    assert all(model.token_proj[m].weight.grad.abs().sum() > 0 for m in ("image", "text"))
    assert all(model.summary_proj[m].weight.grad.abs().sum() == 0 for m in ("image", "text"))
    assert not any(b.requires_grad for b in model.codebook.buffers())


def test_cmg_extensions_need_aligned_modalities():
    aligned = make_bridge(["audio", "image"], mm_ema=True, cross_commitment=True).train()
    loss, _ = aligned.loss(aligned(features(["audio", "image"], aligned=True)))
    assert torch.isfinite(loss)
    ragged = make_bridge(["audio", "image"], mm_ema=True)
    with pytest.raises(ValueError, match="CMG extensions"):
        ragged(features(["audio", "image"]))


def test_dominant_codes_and_agreement():
    codes = torch.tensor([[3, 3, 1, -1], [2, 0, 0, 2], [-1, -1, -1, -1]])
    assert dominant_codes(codes, 4).tolist() == [3, 0, -1]  # ties: the smallest code
    model = make_bridge(["image", "text"]).eval()
    f = features(["image", "text"])["image"]
    tokens = f.tokens[..., :5]  # text tokens; image tokens are the same with a 6th feature the projection ignores
    with torch.no_grad():
        model.token_proj["image"].weight[:, 5:] = 0.0
        model.token_proj["text"].load_state_dict(
            {"weight": model.token_proj["image"].weight[:, :5], "bias": model.token_proj["image"].bias}
        )
    image = Features(torch.cat([tokens, torch.randn_like(f.tokens[..., 5:])], -1), f.mask, f.summary)
    pair = {"image": image, "text": Features(tokens, f.mask, f.summary[:, :5])}
    model(pair)
    assert model.usage() == {}  # evaluation forwards are not counted
    model.train()(pair)
    stats = model.usage()
    assert stats["codebook/agreement/image-text"] == 1.0 and stats["codebook/agreement"] == 1.0
    assert stats["codebook/usage/image"] == stats["codebook/usage/text"] > 0
    assert {"codebook/perplexity", "codebook/dead_fraction", "codebook/perplexity/text"} <= set(stats)
    assert model.usage() == {}


def test_bad_config_names_the_field():
    for field, value in (("fusion_lambda", -1.0), ("size", 0), ("decay", 1.0), ("dim", 0)):
        with pytest.raises(ConfigError, match=rf"^model\.bridge\.codebook\.{field}: {value} is out of range"):
            load_config(overrides=["model.bridge.name=codebook", f"model.bridge.codebook.{field}={value}"])
    with pytest.raises(KeyError, match="built for"):
        make_bridge(["image", "text"])(features(["audio"]))


# ---------------------------------------------------------------------------------------------------------------
# Two gloo processes with half the batch each train exactly like one process with the whole batch.
# ---------------------------------------------------------------------------------------------------------------
SETUPS = {
    "default": (["audio", "image", "text"], {}, False),
    "cmg": (["audio", "image", "text"], {"mm_ema": True, "cross_commitment": True, "cmcm_symmetric": True}, True),
}


def _step(setup: str, rows: slice) -> tuple[torch.Tensor, CodebookBridge, dict[str, Features]]:
    modalities, options, aligned = SETUPS[setup]
    model = make_bridge(modalities, **options).train()
    feats = {}
    for m, f in features(modalities, batch=6, aligned=aligned).items():
        tokens, summary = f.tokens[rows].clone().requires_grad_(), f.summary[rows].clone().requires_grad_()
        feats[m] = Features(tokens, f.mask[rows], summary)
    loss, _ = model.loss(model(feats))
    loss.backward()
    return loss.detach(), model, feats


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        for setup in SETUPS:
            loss, model, feats = _step(setup, slice(rank * 3, rank * 3 + 3))
            dist.all_reduce(loss)
            grads = {}
            for name, p in model.named_parameters():
                dist.all_reduce(p.grad)
                grads[name] = p.grad / world
            inputs = {m: (f.tokens.grad / world, f.summary.grad / world) for m, f in feats.items()}
            buffers = {n: b.clone() for n, b in model.codebook.named_buffers()}
            result[setup] = {"loss": loss / world, "grads": grads, "inputs": inputs, "buffers": buffers}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for setup in SETUPS:
        loss, model, feats = _step(setup, slice(0, 6))
        got = [r[setup] for r in ranks]
        assert torch.allclose(got[0]["loss"], loss, atol=1e-5), setup
        for name, p in model.named_parameters():
            assert all(torch.allclose(r["grads"][name], p.grad, atol=1e-5) for r in got), (setup, name)
        for m, f in feats.items():
            for i, full in enumerate((f.tokens.grad, f.summary.grad)):
                assert torch.allclose(torch.cat([r["inputs"][m][i] for r in got]), full, atol=1e-5), (setup, m)
        for name, b in model.codebook.named_buffers():
            assert all(torch.allclose(r["buffers"][name], b, atol=1e-5) for r in got), (setup, name)


# ---------------------------------------------------------------------------------------------------------------
# A tiny training: paired sequences generated from shared latent concepts.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny ops: more threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_matches_codes_across_modalities(one_thread):
    """CMCM loss falls and dominant codes come to agree. The discrete summary trains only its projection here
    (discrete_ste=False): through the straight-through estimator it keeps the modalities on separate codes in this
    toy (docs/bridges-codebook.md)."""
    torch.manual_seed(0)
    concepts, dims = 6, {"image": 10, "text": 8}
    prototypes = {m: 3 * torch.randn(concepts, d) for m, d in dims.items()}
    options = {"size": 8, "dim": 8, "dead_code_threshold": 5, "decay": 0.9, "discrete_ste": False}
    model = CodebookBridge(
        BridgeConfig(name="codebook", embed_dim=8, sections={"codebook": CodebookConfig(**options)}), dims
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def sample(batch: int = 32) -> dict[str, Features]:
        labels = torch.randint(concepts, (batch,), generator=g)
        out = {}
        for m, t in (("image", 6), ("text", 4)):
            tokens = prototypes[m][labels].unsqueeze(1) + torch.randn(batch, t, dims[m], generator=g)
            out[m] = Features(tokens, torch.ones(batch, t, dtype=torch.bool), tokens.mean(1))
        return out

    cmcm, agreement = [], []
    for step in range(80):
        loss, logs = model.train().loss(model(sample()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cmcm.append(logs["loss/cmcm"])
        if step % 20 == 19:
            agreement.append(model.usage()["codebook/agreement"])
    first, last = sum(cmcm[:10]) / 10, sum(cmcm[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert agreement[-1] > agreement[0] + 0.3 and agreement[-1] > 0.6, agreement
