"""SimVQ, the rotation trick and FSQ against plain float64 references written here, and the codebook bridge with
each of them (knobs ``model.bridge.codebook.{parametrization, estimator, quantizer}``)."""

from __future__ import annotations

import pytest
import torch

from codebridge.config import BridgeConfig, ConfigError, from_dict
from codebridge.models.bridges.codebook import CodebookBridge, CodebookConfig
from codebridge.models.bridges.vector_quantizer import (
    FiniteScalarQuantizer,
    SimVectorQuantizer,
    fsq_codes,
    fsq_indices,
    rotation_trick,
)
from codebridge.models.features import Features

torch.set_num_threads(1)


def reference_rotation(x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda, R) of one pair of vectors, straight from Fifty et al. 2024 Eq. (4): R = I - 2 r r^T + 2 e^ x^T."""
    xh, eh = x / x.norm(), e / e.norm()
    r = (xh + eh) / (xh + eh).norm()
    eye = torch.eye(len(x), dtype=x.dtype)
    return e.norm() / x.norm(), eye - 2 * torch.outer(r, r) + 2 * torch.outer(eh, xh)


def test_rotation_trick_value_is_the_code_and_gradient_is_lambda_r_transpose_g():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    e = torch.randn(6, 5, dtype=torch.float64, generator=g)
    upstream = torch.randn(6, 5, dtype=torch.float64, generator=g)
    out = rotation_trick(x, e)
    assert torch.allclose(out, e, atol=1e-12)
    (grad,) = torch.autograd.grad(out, x, upstream)
    for i in range(6):
        lam, rot = reference_rotation(x[i].detach(), e[i])
        assert torch.allclose(rot @ rot.T, torch.eye(5, dtype=torch.float64), atol=1e-12)  # a rotation
        assert torch.allclose(grad[i], lam * rot.T @ upstream[i], atol=1e-12)
    straight = torch.autograd.grad(x + (e - x).detach(), x, upstream)[0]
    assert not torch.allclose(grad, straight)  # not the straight-through estimator


def batch(b: int = 3, t: int = 4, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return torch.randn(b, t, d, dtype=torch.float64, generator=g), mask


def test_quantizer_with_rotation_estimator():
    vq = SimVectorQuantizer(8, 4, dead_code_threshold=0, estimator="rotation").double()
    x, mask = batch()
    x.requires_grad_(True)
    out = vq({"a": x}, {"a": mask})["a"]
    codes = vq.code_vectors().detach()
    assert torch.allclose(out.quantized[mask], codes[out.codes[mask]], atol=1e-12)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(out.quantized, x, upstream, retain_graph=True)
    for b, t in mask.nonzero().tolist():
        lam, rot = reference_rotation(x[b, t].detach(), codes[out.codes[b, t]])
        assert torch.allclose(grad[b, t], lam * rot.T @ upstream[b, t], atol=1e-10)
    assert (grad[~mask] == 0).all()


def test_simvq_codes_are_a_learned_map_of_a_frozen_basis():
    torch.manual_seed(0)
    vq = SimVectorQuantizer(8, 4, commitment_weight=0.25, dead_code_threshold=0).double()
    x, mask = batch()
    codes = vq.basis @ vq.transform.weight.T  # float64 reference: q = C W
    out = vq({"a": x}, {"a": mask})["a"]
    want_codes = torch.cdist(x, codes.detach().expand(len(x), -1, -1)).argmin(-1).masked_fill(~mask, -1)
    assert torch.equal(out.codes, want_codes)
    nearest = codes[want_codes.clamp_min(0)]
    n = mask.sum() * 4
    want_codebook = ((x - nearest) ** 2).sum(-1)[mask].sum() / n  # ||sg(x) - q||^2, gradient to W
    assert torch.allclose(out.codebook_loss, want_codebook, atol=1e-12)
    assert torch.allclose(out.commitment, 0.25 * ((x - nearest.detach()) ** 2).sum(-1)[mask].sum() / n, atol=1e-12)
    (grad_w,) = torch.autograd.grad(want_codebook, vq.transform.weight)
    assert "basis" not in dict(vq.named_parameters()) and not vq.basis.requires_grad
    basis, weight = vq.basis.clone(), vq.transform.weight.detach().clone()
    vq.train()
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    loss = vq({"a": x}, {"a": mask})["a"].codebook_loss
    loss.backward()
    assert torch.allclose(vq.transform.weight.grad, grad_w, atol=1e-12)
    opt.step()
    assert torch.equal(vq.basis, basis)  # frozen
    assert not torch.allclose(vq.transform.weight, weight)  # trained


def test_simvq_dead_codes_restart_onto_data():
    torch.manual_seed(0)
    vq = SimVectorQuantizer(8, 4, dead_code_threshold=2, estimator="rotation").double().train()
    x, mask = batch()
    with torch.no_grad():  # code 7 far from every input: never used
        far = vq.basis[7] * 0 + 100.0
        vq.basis[7] = far @ torch.linalg.pinv(vq.transform.weight.T)
    vq({"a": x}, {"a": mask})
    assert vq.unused_steps[7] == 1
    vq({"a": x}, {"a": mask})
    code = vq.code_vectors().detach()[7]
    assert vq.unused_steps[7] == 0
    assert torch.isclose(torch.cdist(code[None], x[mask]).min(), torch.zeros((), dtype=torch.float64), atol=1e-8)


def reference_fsq(z: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised codes, indices), per dimension and level in plain Python: Mentzer et al. 2023, App. A."""
    codes = torch.empty_like(z)
    index = torch.zeros(z.shape[:-1], dtype=torch.long)
    radix = 1
    for i, level in enumerate(levels):
        half = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        bounded = torch.tanh(z[..., i] + torch.atanh(torch.tensor(offset / half, dtype=z.dtype))) * half - offset
        digit = torch.round(bounded)
        codes[..., i] = digit / (level // 2)
        index += (digit.long() + level // 2) * radix
        radix *= level
    return codes, index


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4], [3, 7, 4]])
def test_fsq_codes_and_indices(levels):
    lv = torch.tensor(levels)
    k = int(torch.prod(lv))
    grid = fsq_codes(torch.arange(k), lv)
    assert len({tuple(row.tolist()) for row in grid}) == k and grid.abs().max() <= 1
    assert torch.equal(fsq_indices(grid * (lv // 2), lv), torch.arange(k))  # index -> code -> index
    fsq = FiniteScalarQuantizer(levels).double()
    z = 3 * torch.randn(64, 5, len(levels), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z.requires_grad_(True)
    out = fsq({"a": z})["a"]
    want_codes, want_index = reference_fsq(z.detach(), levels)
    assert torch.equal(out.codes, want_index)
    assert torch.allclose(out.quantized, want_codes, atol=1e-12)
    for i, level in enumerate(levels):  # every level reachable, no more
        assert len(torch.unique(want_codes[..., i])) == level
    # straight-through: the gradient is that of the bound (tanh), divided by L // 2
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    bound = torch.func.vmap(torch.func.grad(lambda v: reference_bounded(v, levels).sum()))(
        z.detach().reshape(-1, len(levels))
    )
    assert torch.allclose(grad.reshape(-1, len(levels)), bound, atol=1e-10)
    assert out.commitment == 0 and out.codebook_loss == 0


def reference_bounded(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    out = []
    for i, level in enumerate(levels):
        half = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        out.append(
            (torch.tanh(z[..., i] + torch.atanh(torch.tensor(offset / half, dtype=z.dtype))) * half - offset)
            / (level // 2)
        )
    return torch.stack(out, -1)


WIDTHS = {"image": 6, "text": 5}
VARIANTS = {
    "simvq": {"parametrization": "simvq"},
    "rotation": {"estimator": "rotation"},
    "simvq+rotation": {"parametrization": "simvq", "estimator": "rotation"},
    "fsq": {"quantizer": "fsq", "fsq_levels": [3, 3, 4]},
}


def toy_features(seed: int = 0) -> dict[str, Features]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, w in WIDTHS.items():
        mask = torch.rand(8, 4, generator=g) > 0.3
        mask[:, 0] = True
        out[m] = Features(torch.randn(8, 4, w, generator=g), mask, torch.randn(8, w, generator=g))
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_codebook_bridge_with_each_method(variant):
    torch.manual_seed(0)
    cb = CodebookConfig(size=8, dim=None if variant == "fsq" else 4, dead_code_threshold=1, **VARIANTS[variant])
    bridge = CodebookBridge(BridgeConfig(name="codebook", embed_dim=4, sections={"codebook": cb}), WIDTHS).train()
    k = 36 if variant == "fsq" else 8
    feats = toy_features()
    total, parts = bridge.loss(bridge(feats, 0), 0)
    total.backward()
    assert torch.isfinite(total) and all(p.grad is not None for p in bridge.token_proj.parameters())
    if variant.startswith("simvq"):
        assert bridge.codebook.transform.weight.grad.abs().sum() > 0 and "loss/codebook" in parts
        assert "codebook.transform.weight" in bridge.no_weight_decay()
    space = bridge.discrete_space()
    assert space.size == k and space.scores("image", feats["image"]).shape == (8, 4, k)
    bridge(toy_features(1), 1)  # a second batch: codes unused twice in a row are restarted (not FSQ's)
    usage = bridge.usage()
    assert 0 <= usage["codebook/dead_fraction"] <= 1
    if variant != "fsq":
        assert bridge.codebook.unused_steps.max() <= 1
    assert f"{k} shared" in CodebookBridge.describe(bridge.cfg)


def test_bad_method_combinations_name_the_field():
    with pytest.raises(ConfigError, match="quantizer"):
        from_dict(CodebookConfig, {"quantizer": "fsq", "parametrization": "simvq"}, "model.bridge.codebook").check()
    cfg = CodebookConfig(quantizer="fsq", fsq_levels=[4, 1])
    assert any("fsq_levels" in message for message in cfg.check())
    with pytest.raises(ConfigError, match="estimator"):
        from_dict(CodebookConfig, {"estimator": "gumbel"}, "model.bridge.codebook")
