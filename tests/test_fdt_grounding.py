import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from codebridge.models.bridges.fdt_grounding import pooled_scores, token_scores

B, T, C, D = 4, 7, 12, 5
TEMPERATURE = 0.5


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    q[:, 4] = q[:, 1]  # tied scores across positions (and across chunks for chunk sizes 2 and 3)
    q[0, 2] = 0.0  # a real token scoring exactly 0, tied with the zeros of padded positions in pad_mode zero
    tokens = torch.randn(C, D, dtype=torch.float64, generator=g)
    tokens[5] = tokens[2]  # tied tokens
    lengths = torch.tensor([T, 3, 5, 1])
    mask = torch.arange(T) < lengths[:, None]
    return q, tokens, mask


def _scores_and_grads(q, tokens, mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, tokens = q.clone().requires_grad_(), tokens.clone().requires_grad_()
    out = pooled_scores(q, tokens, mask, TEMPERATURE, **kwargs)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9))
    grad_q, grad_tokens = torch.autograd.grad((out * weights).sum(), (q, tokens))
    return out, grad_q, grad_tokens


def test_naive_scores_follow_formula():
    q, tokens, mask = _inputs()
    s = token_scores(q, tokens, mask, TEMPERATURE)
    b, t, c = 1, 2, 3
    assert math.isclose(s[b, t, c].item(), (q[b, t] @ tokens[c]).item() / math.sqrt(D) / TEMPERATURE, rel_tol=1e-12)
    assert (s[~mask] == float("-inf")).all()
    assert (token_scores(q, tokens, mask, TEMPERATURE, "zero")[~mask] == 0).all()
    pooled = pooled_scores(q, tokens, mask, TEMPERATURE)
    assert torch.equal(pooled[b], s[b, : int(mask[b].sum())].max(0).values)


@pytest.mark.parametrize("pad_mode", ["neg_inf", "zero"])
@pytest.mark.parametrize("pooling", ["max", "mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 2, 3, T, T + 5])
def test_lean_path_equals_naive(pad_mode, pooling, chunk):
    q, tokens, mask = _inputs()
    naive = _scores_and_grads(q, tokens, mask, pooling=pooling, pad_mode=pad_mode, chunk_size=0)
    lean = _scores_and_grads(q, tokens, mask, pooling=pooling, pad_mode=pad_mode, chunk_size=chunk)
    for name, a, b in zip(("scores", "grad q", "grad tokens"), naive, lean, strict=True):
        assert torch.allclose(a, b, atol=1e-12), name


def test_max_gradient_reaches_only_the_argmax_token():
    q, tokens, mask = _inputs(1)
    _, grad_q, _ = _scores_and_grads(q, tokens, mask, chunk_size=2)
    winners = token_scores(q, tokens, mask, TEMPERATURE).max(dim=1).indices  # [B, C]
    for b in range(B):
        hit = torch.zeros(T, dtype=torch.bool)
        hit[winners[b]] = True
        assert (grad_q[b, ~hit] == 0).all()
        assert (grad_q[b, 4] == 0).all()  # position 4 ties position 1: the first occurrence wins


def test_pad_modes_differ_exactly_as_documented():
    q, tokens, mask = _inputs(2)
    count = mask.sum(1, keepdim=True).double()
    for chunk in (0, 3):
        fix = {p: pooled_scores(q, tokens, mask, TEMPERATURE, p, "neg_inf", chunk) for p in ("max", "mean", "sum")}
        quirk = {p: pooled_scores(q, tokens, mask, TEMPERATURE, p, "zero", chunk) for p in ("max", "mean", "sum")}
        padded = ~mask.all(1)
        # max: a padded input's score is floored at 0; an unpadded one is unchanged
        assert torch.equal(quirk["max"][padded], fix["max"][padded].clamp_min(0))
        assert torch.equal(quirk["max"][~padded], fix["max"][~padded])
        assert (fix["max"][padded] < 0).any()  # so the floor really changes something here
        # mean: the quirk divides the sum of the real scores by all T positions; sum: identical
        assert torch.allclose(quirk["mean"], fix["mean"] * count / T, atol=1e-12)
        assert torch.allclose(quirk["sum"], fix["sum"], atol=1e-12)


def test_zero_pad_max_has_no_gradient_from_padding():
    q, tokens, mask = _inputs(3)
    out, grad_q, _ = _scores_and_grads(q, tokens, mask, pad_mode="zero", chunk_size=2)
    assert (grad_q[~mask] == 0).all()
    assert (out >= 0)[~mask.all(1)].all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (forward and backward) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        return out


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_lean_path_never_builds_the_full_score_tensor(pooling):
    q, tokens, mask = _inputs()
    largest = {}
    for chunk in (0, 2):
        q_, tokens_ = q.clone().requires_grad_(), tokens.clone().requires_grad_()
        with _LargestTensor() as probe:
            pooled_scores(q_, tokens_, mask, TEMPERATURE, pooling, "neg_inf", chunk).sum().backward()
        largest[chunk] = probe.numel
    assert largest[0] >= B * T * C  # the naive path materialises [B, T, C]
    assert largest[2] <= max(B * 2 * C, q.numel(), tokens.numel()) < B * T * C


def test_rejects_negative_chunk():
    q, tokens, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        pooled_scores(q, tokens, mask, TEMPERATURE, chunk_size=-1)
