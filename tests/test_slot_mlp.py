"""models/slot_mlp.py: the fused slot scorer gives the plain formula's values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from livemb.models import slot_mlp
from livemb.models.repeat import MixtureHead


def plain(feats, filled, w1, b1, w2, b2):
    """The unfused formula the mixture head used before: full (B, M, H) tensors through autograd."""
    z = torch.relu(feats @ w1.T + b1)  # (B, M, H)
    logits = (z @ w2.T + b2).squeeze(-1).masked_fill(~filled, -math.inf)
    pooled = z.masked_fill(~filled[..., None], 0.0).max(dim=1).values
    return logits, pooled


def inputs(B=37, M=9, F=5, H=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, M, F, generator=g, dtype=dtype)
    filled = torch.rand(B, M, generator=g) > 0.3
    filled[0] = False  # a target with an empty memory
    filled[1] = True
    feats = feats * filled[..., None]  # memory_features zeroes the empty slots
    feats[2, 1] = feats[2, 0]  # two identical slots: a tie in the max-pool
    params = [torch.randn(H, F, generator=g, dtype=dtype), torch.randn(H, generator=g, dtype=dtype),
              torch.randn(1, H, generator=g, dtype=dtype), torch.randn(1, generator=g, dtype=dtype)]
    return feats, filled, [p.requires_grad_() for p in params]


@pytest.mark.parametrize("chunk_rows", [1, 7, 8192])  # one target per chunk, chunks across targets, one chunk
def test_values_and_gradients_match_the_plain_formula(monkeypatch, chunk_rows):
    monkeypatch.setattr(slot_mlp, "CHUNK_ROWS", chunk_rows)
    feats, filled, params = inputs()
    g = torch.Generator().manual_seed(1)
    g_logits, g_pooled = torch.randn(feats.shape[:2], generator=g, dtype=feats.dtype), torch.randn(
        feats.shape[0], params[0].shape[0], generator=g, dtype=feats.dtype)
    outs = []
    for fn in (plain, slot_mlp.slot_scores):
        logits, pooled = fn(feats, filled, *params)
        loss = (logits.masked_fill(~filled, 0.0) * g_logits).sum() + (pooled * g_pooled).sum()
        grads = torch.autograd.grad(loss, params)
        outs.append((logits, pooled, grads))
    (l0, p0, g0), (l1, p1, g1) = outs
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(p1, p0)
    assert torch.equal(p1[0], torch.zeros_like(p1[0]))  # nothing filled: the pool is 0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck():
    feats, filled, params = inputs(B=6, M=4, F=3, H=3, seed=2)
    def fn(*p):
        logits, pooled = slot_mlp.slot_scores(feats, filled, *p)
        return logits.masked_fill(~filled, 0.0), pooled
    assert torch.autograd.gradcheck(fn, tuple(params))


def test_the_head_uses_it_and_refuses_trainable_features():
    head = MixtureHead(n_types=5, dim=8, state_dim=6, hidden=16)
    feats, filled, _ = inputs(B=11, M=7, F=7 + 2 * 5, H=16, dtype=torch.float32)
    rep, gate = head(feats, filled, torch.randn(11, 8), torch.randn(11, 6))
    lin = head.slot[0]
    logits, pooled = plain(feats, filled, lin.weight, lin.bias, head.slot_out.weight, head.slot_out.bias)
    torch.testing.assert_close(head.slot_logits(feats, filled)[0], logits)
    assert torch.isinf(rep[0]).all() and torch.isinf(gate[0])  # an empty memory: no repeat path
    with pytest.raises(ValueError, match="fixed inputs"):
        slot_mlp.slot_scores(feats.requires_grad_(), filled, lin.weight, lin.bias, head.slot_out.weight,
                             head.slot_out.bias)
