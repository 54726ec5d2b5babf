"""Fused explore log-partition for training: log Z and a few picked scores from one product.

The mixture NLL (models/train.mixture_loss) needs, per target, log Z = log sum_j w_j exp <u, x_j>
over the catalogue (or a uniform sample of it) and the explore scores of a few columns (the
memory slots, the target). Through plain autograd that costs, on top of the (n, K) product, a
zero-filled (n, K) gradient per gather, the log-sum-exp's own softmax and several copies: on
ML-100K the backward of these was the largest part of a training step. `explore_logz` computes
the same values with a hand-written backward: one (n, K) softmax pass, one sparse scatter of the
picked columns' gradients into it, one (n, K) x (K, D) product. Item vectors are fixed inputs, so
only u gets a gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _ExploreLogZ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, vecs: Tensor, pick: Tensor, log_weight: float, drop_rows: Tensor, drop_cols: Tensor):
        s = u @ vecs.T  # (n, K)
        picked = s.gather(1, pick)  # (n, P)
        if log_weight:
            s.add_(log_weight)
        if len(drop_rows):
            s[drop_rows, drop_cols] = -math.inf
        logz = torch.logsumexp(s, dim=1)  # (n,)
        ctx.save_for_backward(s, logz, vecs, pick)
        ctx.mark_non_differentiable(pick)
        return logz, picked

    @staticmethod
    def backward(ctx, g_logz: Tensor, g_picked: Tensor):
        s, logz, vecs, pick = ctx.saved_tensors
        g = (s - logz[:, None]).exp_().mul_(g_logz[:, None])  # softmax * dL/dlogZ, (n, K); dropped: exp(-inf) = 0
        g.scatter_add_(1, pick, g_picked)
        return g @ vecs, None, None, None, None, None


def explore_logz(u: Tensor, vecs: Tensor, pick: Tensor | None = None, log_weight: float = 0.0,
                 drop: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """u (n, D), vecs (K, D) fixed item vectors -> (logz (n,), picked (n, P)).

    logz = logsumexp_j(<u, vecs_j> + log_weight) over the columns j not dropped; picked = the raw
    scores <u, vecs_j> at the columns `pick` (n, P) (P = 0 when None); drop = (rows, cols) of
    entries left out of Z (a sampled column equal to the row's target)."""
    if vecs.requires_grad:
        raise ValueError("explore_logz treats the item vectors as fixed inputs (no gradient)")
    n = u.shape[0]
    if pick is None:
        pick = torch.zeros((n, 0), dtype=torch.int64, device=u.device)
    empty = torch.zeros(0, dtype=torch.int64, device=u.device)
    rows, cols = drop if drop is not None else (empty, empty)
    return _ExploreLogZ.apply(u, vecs, pick, float(log_weight), rows, cols)
