import math

import pytest
import torch

from codebridge.models.bridges.vector_quantizer import EMAVectorQuantizer, perplexity, squared_distances

K, D = 6, 3


def quantizer(**kw) -> EMAVectorQuantizer:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(K, D, **{"dead_code_threshold": 0, **kw}).double()
    with torch.no_grad():  # codes spread like the data, so that several are used
        vq.embed.normal_()
        vq.embed_sum.copy_(vq.embed * vq.cluster_size.unsqueeze(-1))
    return vq


def batch(b: int = 4, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, D, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return x, mask


def nearest(x: torch.Tensor, embed: torch.Tensor) -> int:
    """Brute force, float64: the index of the closest code."""
    return min(range(len(embed)), key=lambda k: float(((x.detach() - embed[k]) ** 2).sum()))


def reference_step(embed, n, w, rows: list[tuple[torch.Tensor, int]], decay: float, eps: float):
    """One EMA step by hand from (target vector, code) rows, with Laplace smoothing of the counts."""
    counts, sums = torch.zeros_like(n), torch.zeros_like(w)
    for target, k in rows:
        counts[k] += 1
        sums[k] += target
    n = decay * n + (1 - decay) * counts
    total = n.sum()
    n = (n + eps) / (total + len(n) * eps) * total
    w = decay * w + (1 - decay) * sums
    return w / n.unsqueeze(-1), n, w


def state(vq: EMAVectorQuantizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return vq.embed.clone(), vq.cluster_size.clone(), vq.embed_sum.clone()


def test_distances_by_one_matmul_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    embed = torch.randn(5, 4, generator=g, dtype=torch.float64)
    embed[2] = x[3]  # an exact hit: rounding must not give a negative squared distance
    brute = torch.tensor([[float(((xi - e) ** 2).sum()) for e in embed] for xi in x], dtype=torch.float64)
    got = squared_distances(x, embed)
    assert torch.allclose(got, brute, atol=1e-12)
    assert (got >= 0).all()


def test_one_ema_step_matches_hand_computation():
    vq = quantizer(decay=0.9, eps=1e-3)
    x, mask = batch()
    embed, n, w = state(vq)
    vq.train()({"a": x}, {"a": mask})
    rows = [(x[b, t], nearest(x[b, t], embed)) for b in range(4) for t in range(5) if mask[b, t]]
    ref_embed, ref_n, ref_w = reference_step(embed, n, w, rows, 0.9, 1e-3)
    assert torch.allclose(vq.cluster_size, ref_n, atol=1e-12)
    assert torch.allclose(vq.embed_sum, ref_w, atol=1e-12)
    assert torch.allclose(vq.embed, ref_embed, atol=1e-12)
    assert math.isclose(vq.cluster_size.sum().item(), ref_n.sum().item())  # smoothing keeps the total


def test_shared_codebook_is_updated_once_from_every_input():
    vq = quantizer()
    (xa, ma), (xb, mb) = batch(seed=1), batch(b=3, t=2, seed=2)
    embed, n, w = state(vq)
    vq.train()({"a": xa, "b": xb}, {"a": ma, "b": mb})
    rows = [(x[i, t], nearest(x[i, t], embed)) for x, m in ((xa, ma), (xb, mb)) for i, t in m.nonzero().tolist()]
    ref_embed, _, _ = reference_step(embed, n, w, rows, 0.99, 1e-5)
    assert torch.allclose(vq.embed, ref_embed, atol=1e-12)


def test_codes_straight_through_and_padding():
    vq = quantizer().eval()
    x, mask = batch()
    x.requires_grad_()
    out = vq({"a": x}, {"a": mask})["a"]
    for b in range(4):
        for t in range(5):
            if mask[b, t]:
                k = nearest(x[b, t].detach(), vq.embed)
                assert out.codes[b, t] == k
                assert torch.allclose(out.quantized[b, t], vq.embed[k])  # value: the code
            else:
                assert out.codes[b, t] == -1 and (out.quantized[b, t] == 0).all()
    weight = torch.randn(4, 5, D, dtype=torch.float64)
    (out.quantized * weight).sum().backward()
    assert torch.equal(x.grad, weight * mask.unsqueeze(-1))  # gradient: identity at real positions, 0 at padding


def test_distances_have_gradient_to_inputs_only():
    vq = quantizer().eval()
    x, mask = batch()
    x.requires_grad_()
    out = vq({"a": x}, {"a": mask})["a"]
    for b, t in mask.nonzero().tolist():
        brute = torch.stack([(x[b, t] - e).norm() for e in vq.embed])
        assert torch.allclose(out.distances[b, t], brute, atol=1e-10)
    out.distances.sum().backward()
    assert x.grad is not None and not any(b.requires_grad for b in vq.buffers())


def test_commitment_is_beta_mse_over_valid_positions():
    vq = quantizer(commitment_weight=0.3).eval()
    x, mask = batch()
    x.requires_grad_()
    out = vq({"a": x}, {"a": mask})["a"]
    errors = [((x[b, t] - vq.embed[nearest(x[b, t], vq.embed)]) ** 2).sum() for b, t in mask.nonzero().tolist()]
    expected = 0.3 * torch.stack(errors).sum() / (len(errors) * D)
    assert torch.allclose(out.commitment, expected, atol=1e-12)
    out.commitment.backward()
    e = vq.embed[out.codes.clamp_min(0)]
    assert torch.allclose(x.grad, 2 * 0.3 * (x - e).detach() * mask.unsqueeze(-1) / (len(errors) * D))


def test_padding_with_garbage_changes_nothing():
    x, mask = batch()
    garbage = torch.full((4, 3, D), float("nan"), dtype=torch.float64)
    garbage[0] = 1e6
    x_long = torch.cat([x, garbage], dim=1)
    mask_long = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    results = []
    for inputs, m in ((x, mask), (x_long, mask_long)):
        vq = quantizer(dead_code_threshold=2).train()
        inputs = inputs.clone().requires_grad_()
        for _ in range(3):  # EMA steps and a dead-code restart
            torch.manual_seed(5)
            out = vq({"a": inputs}, {"a": m})["a"]
        out.commitment.backward()
        results.append((out, inputs.grad[:, :5], state(vq), vq.pop_usage()["a"]))
    (short, g_short, s_short, u_short), (long, g_long, s_long, u_long) = results
    assert torch.equal(short.codes, long.codes[:, :5]) and (long.codes[:, 5:] == -1).all()
    assert torch.allclose(short.quantized, long.quantized[:, :5]) and (long.quantized[:, 5:] == 0).all()
    assert torch.allclose(short.distances, long.distances[:, :5])
    assert torch.allclose(short.commitment, long.commitment)
    assert torch.allclose(g_short, g_long)
    assert all(torch.allclose(a, b) for a, b in zip(s_short, s_long, strict=True))
    assert torch.equal(u_short, u_long)


def test_eval_mode_never_updates():
    vq = quantizer(dead_code_threshold=1).eval()
    before = [b.clone() for b in vq.buffers()]
    vq({"a": batch()[0]})
    assert all(torch.equal(a, b) for a, b in zip(before, vq.buffers(), strict=True))


def test_dead_codes_are_restarted_onto_data_and_then_used():
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(8, 2, dead_code_threshold=3).double().train()
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    centres = 5 * torch.stack([angles.cos(), angles.sin()], dim=-1)  # 8 clusters for 8 codes

    def data() -> torch.Tensor:
        return centres[torch.randint(8, (16, 8), generator=g)] + 0.3 * torch.randn(16, 8, 2, generator=g).double()

    for _ in range(2):
        vq({"a": data()})
    dead = vq.unused_steps == 2
    assert dead.sum() >= 2  # the tiny initial codebook: some codes win no vector at all
    before = vq.embed.clone()
    x = data()
    vq({"a": x})
    assert (vq.unused_steps[dead] == 0).all()
    assert all((x.reshape(-1, 2) == r).all(-1).any() for r in vq.embed[dead])  # each one is now an encoder vector
    assert torch.allclose(vq.embed[dead].norm(dim=-1), torch.full((int(dead.sum()),), 5.0).double(), atol=1.5)
    assert (before[dead].norm(dim=-1) < 0.2).all()
    vq.pop_usage()
    for _ in range(5):
        vq({"a": data()})
    assert (vq.pop_usage()["a"] > 0).all()  # the revived codes win assignments: every code is in use


def test_kmeans_init_finds_the_clusters_on_the_first_training_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = centres[torch.arange(64) % 4].reshape(8, 8, 2) + 0.1 * torch.randn(8, 8, 2, generator=g, dtype=torch.float64)
    vq = EMAVectorQuantizer(4, 2, kmeans_init=True, kmeans_iters=10, decay=0.0).double()
    vq.eval()({"a": x})
    assert not vq.initted  # evaluation never initialises
    vq.train()({"a": x})
    assert vq.initted
    gaps = torch.cdist(centres, vq.embed).min(-1).values
    assert (gaps < 0.1).all(), gaps
    assert torch.allclose(vq.cluster_size, torch.full((4,), 16.0, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("n_inputs", [2, 3])
def test_mm_ema_mixes_paired_features_modality_by_modality(n_inputs):
    vq = quantizer(mm_ema=True)
    names = ["a", "b", "c"][:n_inputs]
    x = {m: batch(seed=i)[0] for i, m in enumerate(names)}
    mask = batch()[1]
    embed, n, w = state(vq)
    vq.train()(x, {m: mask for m in names})
    codes = {m: {(b, t): nearest(x[m][b, t], embed) for b, t in mask.nonzero().tolist()} for m in names}
    cross = 0.5 if n_inputs == 2 else 0.25  # CMG: 0.5/0.5 bimodal, 0.5/0.25/0.25 tri-modal
    for m in names:  # CMG order: one full EMA step per modality, the codes all from the pre-update codebook
        rows = [(0.5 * x[m][p] + cross * sum(x[o][p] for o in names if o != m), k) for p, k in codes[m].items()]
        embed_next, n, w = reference_step(embed, n, w, rows, 0.99, 1e-5)
    assert torch.allclose(vq.embed, embed_next, atol=1e-12)


@pytest.mark.parametrize("n_inputs", [2, 3])
def test_cross_commitment_weights(n_inputs):
    vq = quantizer(cross_commitment=True, commitment_weight=0.25).eval()
    names = ["a", "b", "c"][:n_inputs]
    x = {m: batch(seed=i)[0] for i, m in enumerate(names)}
    mask = batch()[1]
    out = vq(x, {m: mask for m in names})
    cross_weight = 0.25 if n_inputs == 2 else 0.125  # CMG as coded: 2β self + β (bimodal) or 0.5β each (tri-modal)
    positions = mask.nonzero().tolist()
    for m in names:

        def mse(other: str, m: str = m) -> torch.Tensor:
            e = vq.embed[out[other].codes]
            return sum(((x[m][p] - e[p]) ** 2).sum() for p in map(tuple, positions)) / (len(positions) * D)

        expected = 2 * 0.25 * mse(m) + cross_weight * sum(mse(o) for o in names if o != m)
        assert torch.allclose(out[m].commitment, expected, atol=1e-12)


def test_extensions_need_position_aligned_inputs():
    vq = quantizer(mm_ema=True)
    with pytest.raises(ValueError, match="same positions and mask"):
        vq({"a": batch(t=5)[0], "b": batch(t=4)[0]})
    with pytest.raises(ValueError, match=r"expected \[B, T, 3\]"):
        vq({"a": torch.zeros(2, 3, 4)})


def test_usage_and_perplexity():
    assert math.isclose(perplexity(torch.tensor([3, 3, 0, 3])), 3.0)
    assert perplexity(torch.zeros(4)) == 0.0
    vq = quantizer().eval()
    x, mask = batch()
    vq({"a": x}, {"a": mask})
    assert vq.usage_stats() == {}  # evaluation forwards are not counted
    codes = vq.train()({"a": x, "b": x[:2]}, {"a": mask, "b": mask[:2]})
    stats = vq.usage_stats()
    used_a = codes["a"].codes[mask].unique()
    assert math.isclose(stats["usage/a"], len(used_a) / K)
    histogram = torch.bincount(torch.cat([codes["a"].codes[mask], codes["b"].codes[mask[:2]]]), minlength=K)
    assert math.isclose(stats["perplexity"], perplexity(histogram))
    assert math.isclose(stats["dead_fraction"], (histogram == 0).double().mean().item())
    assert vq.usage_stats() == {}  # reset by the call
