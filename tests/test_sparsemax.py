import entmax
import pytest
import torch

from codebridge.models.bridges.sparsemax import AdaptiveTopkSparsemax, capped_sparsemax, sparsemax, topk_sparsemax


def reference_sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo (2016), row by row over the last dim, straight from the formula."""
    rows = []
    for row in z.reshape(-1, z.shape[-1]):
        zs = sorted(row.tolist(), reverse=True)
        k = max(j for j in range(1, len(zs) + 1) if 1 + j * zs[j - 1] > sum(zs[:j]))
        tau = (sum(zs[:k]) - 1) / k
        rows.append(torch.clamp(row - tau, min=0))
    return torch.stack(rows).reshape(z.shape)


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 2.0, -1.0]], dtype=torch.float64)
    return [
        randn(7, 10),  # moderate support
        randn(5, 40, scale=0.05),  # nearly uniform: support is (almost) everything
        randn(6, 30, scale=20.0),  # very sparse: support 1 or 2
        randn(2, 3, 9),  # more than one leading dim
        randn(1, 1),
        ties,
        torch.cat([ties, ties + 3.0], dim=-1),  # ties at the support boundary
    ]


@pytest.mark.parametrize("z", _inputs(), ids=lambda z: "x".join(map(str, z.shape)))
def test_sparsemax_matches_formula(z):
    out = sparsemax(z)
    assert out.dtype == torch.float64
    assert (out >= 0).all()
    assert torch.allclose(out.sum(-1), torch.ones(z.shape[:-1], dtype=z.dtype), atol=1e-12)
    assert torch.allclose(out, reference_sparsemax(z), atol=1e-12)
    assert torch.allclose(out, entmax.sparsemax(z, dim=-1), atol=1e-12)  # an independent implementation


def test_sparsemax_along_other_dim():
    z = torch.randn(6, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sparsemax(z, dim=1), reference_sparsemax(z.transpose(1, 2)).transpose(1, 2), atol=1e-12)


@pytest.mark.parametrize("fn", [sparsemax, lambda z: topk_sparsemax(z, 2)], ids=["sort", "topk"])
def test_gradcheck(fn):
    g = torch.Generator().manual_seed(2)
    for scale in (0.3, 1.0, 3.0):
        z = (scale * torch.randn(4, 9, dtype=torch.float64, generator=g)).requires_grad_()
        assert torch.autograd.gradcheck(fn, (z,))


def test_backward_is_closed_form_jacobian():
    z = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for row in z:
        p = sparsemax(row.unsqueeze(0))[0]
        s = (p > 0).to(p.dtype)
        expected = torch.diag(s) - torch.outer(s, s) / s.sum()  # dp/dz = diag(s) - s s^T / |S|
        jac = torch.autograd.functional.jacobian(lambda x: sparsemax(x.unsqueeze(0))[0], row)
        assert torch.allclose(jac, expected, atol=1e-12)


@pytest.mark.parametrize("z", _inputs(), ids=lambda z: "x".join(map(str, z.shape)))
@pytest.mark.parametrize("k", [1, 2, 3, 64])
def test_topk_equals_full(z, k):
    z = z.clone().requires_grad_()
    full = sparsemax(z)
    part = topk_sparsemax(z, k)
    assert torch.equal(full > 0, part > 0)
    assert torch.allclose(part, full, atol=1e-12)
    weights = torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(4))
    (g_full,) = torch.autograd.grad((full * weights).sum(), z)
    (g_part,) = torch.autograd.grad((part * weights).sum(), z)
    assert torch.allclose(g_part, g_full, atol=1e-12)


def test_topk_support_beyond_k_is_exact():
    # nearly uniform rows: the support is all 50 entries, far beyond the first k=2 (needs 2 -> 4 -> ... -> 64)
    z = 1e-3 * torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert ((sparsemax(z) > 0).sum(-1) == 50).all()
    assert torch.allclose(topk_sparsemax(z, 2), reference_sparsemax(z), atol=1e-12)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_sparsemax(torch.zeros(2, 3), 0)


def test_adaptive_k_follows_support():
    g = torch.Generator().manual_seed(6)
    act = AdaptiveTopkSparsemax(min_k=4)
    dense = 1e-3 * torch.randn(2, 100, dtype=torch.float64, generator=g)
    assert torch.allclose(act(dense), reference_sparsemax(dense), atol=1e-12)
    assert act.k == 200  # twice the observed support of 100
    sparse = 10.0 * torch.randn(2, 100, dtype=torch.float64, generator=g)
    out = act(sparse)
    assert torch.allclose(out, reference_sparsemax(sparse), atol=1e-12)
    assert act.k == max(4, 2 * int((out > 0).sum(-1).max()))
    assert act.k < 200


def test_low_precision_inputs_compute_in_fp32():
    z = torch.randn(4, 33, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    expected = reference_sparsemax(z.double()).float()
    for out in (sparsemax(z), topk_sparsemax(z, 3)):
        assert out.dtype == torch.float32
        assert torch.allclose(out, expected, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparsemax(z.float())
    assert out.dtype == torch.float32
    zb = z.clone().requires_grad_()
    sparsemax(zb)[:, 0].sum().backward()
    assert zb.grad.dtype == torch.bfloat16


def reference_capped(z: torch.Tensor, k: int) -> torch.Tensor:
    """Every value outside a row's k largest masked to -inf, then the formula: a plain reading of the cap."""
    kth = z.sort(-1, descending=True).values[..., k - 1 : k]
    return reference_sparsemax(torch.where(z >= kth, z, torch.full_like(z, -1e30)))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_capped_sparsemax_matches_the_masked_formula(k):
    g = torch.Generator().manual_seed(5)
    for scale in (0.05, 1.0, 20.0):  # support far beyond k, around k, below k
        z = scale * torch.randn(6, 30, dtype=torch.float64, generator=g)
        out = capped_sparsemax(z, k)
        assert ((out > 0).sum(-1) <= k).all()
        assert torch.allclose(out.sum(-1), torch.ones(6, dtype=z.dtype), atol=1e-12)
        assert torch.allclose(out, reference_capped(z, k), atol=1e-12)
        if (sparsemax(z) > 0).sum(-1).max() <= k:  # a support within the cap is left as it is
            assert torch.allclose(out, sparsemax(z), atol=1e-12)


def test_capped_sparsemax_gradient_and_other_dim():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 12, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: capped_sparsemax(x, 4), (z,))
    y = torch.randn(5, 12, 3, dtype=torch.float64, generator=g)
    assert torch.allclose(capped_sparsemax(y, 4, dim=1), capped_sparsemax(y.transpose(1, 2), 4).transpose(1, 2))
    with pytest.raises(ValueError, match="k must be >= 1"):
        capped_sparsemax(y, 0)
