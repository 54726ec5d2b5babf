"""Fused slot scorer of the mixture head: per-slot logits and max-pooled hidden units in row chunks.

The mixture head (models/repeat.MixtureHead) runs a one-layer MLP over every memory slot of every
target, z = relu(feats W1^T + b1) (n, M, H), and reads two things from it: a repeat logit per slot
(z w2 + b2) and the gate's max-pool of z over the filled slots. Through plain autograd a training
batch (n = 6,368 targets, M = 64 slots, H = 32) materialises several (n, M, H) tensors of 52 MB
forward and backward (the hidden units, the masked copy, the ReLU's and the max's gradients):
memory traffic, not arithmetic, and the largest part of a training step on a log with a large
memory. Here both passes walk the rows in chunks that stay in cache, the backward recomputes z
from the (fixed) slot features instead of saving it, and nothing (n, M, H) is ever whole; the pool
is an amax (max() with indices was 20x slower on these shapes, measured).

Same values and gradients as the plain formula (tests/test_slot_mlp.py); the features are fixed
inputs (no gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK_ROWS = 16384  # slot rows (target x slot) per chunk: 16384 x H=32 floats = 2 MiB of hidden units


class _SlotScorer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: Tensor, filled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor):
        B, M, F = feats.shape
        H = w1.shape[0]
        # the bias as one more input column that is 1 at a filled slot and 0 at an empty one (whose
        # features are zeroed too): an empty slot's hidden units are exactly 0, which is what the
        # gate's pool counts them as (ReLU outputs are >= 0), with no (n, M, H) mask pass
        fl = filled.reshape(B * M, 1).to(feats.dtype)
        x = torch.cat([feats.reshape(B * M, F), torch.ones_like(fl)], dim=1).mul_(fl)  # (B M, F + 1)
        w = torch.cat([w1, b1[:, None]], dim=1)  # (H, F + 1)
        logits = torch.empty(B, M, dtype=feats.dtype, device=feats.device)
        pooled = torch.empty(B, H, dtype=feats.dtype, device=feats.device)
        step = max(1, CHUNK_ROWS // M)  # targets per chunk
        for s in range(0, B, step):
            e = min(B, s + step)
            z = torch.mm(x[s * M : e * M], w.t()).relu_()  # (c M, H)
            torch.addmv(b2, z, w2[0], out=logits[s:e].view(-1))
            torch.amax(z.view(e - s, M, H), dim=1, out=pooled[s:e])
        logits.masked_fill_(~filled, -math.inf)
        ctx.save_for_backward(x, filled, w, w2, pooled)
        return logits, pooled

    @staticmethod
    def backward(ctx, g_logits: Tensor, g_pooled: Tensor):
        x, filled, w, w2, pooled = ctx.saved_tensors
        B, M = filled.shape
        H = w.shape[0]
        g_logits = g_logits.masked_fill(~filled, 0.0)  # an empty slot's -inf is a constant
        g_w = torch.zeros_like(w)
        g_w2 = torch.zeros_like(w2[0])
        step = max(1, CHUNK_ROWS // M)
        for s in range(0, B, step):
            e = min(B, s + step)
            xc = x[s * M : e * M]
            z = torch.mm(xc, w.t()).relu_()  # recomputed, (c M, H)
            gl = g_logits[s:e].reshape(-1)  # (c M,)
            g_w2.addmv_(z.t(), gl)
            gz = torch.outer(gl, w2[0])  # (c M, H)
            # the pool's gradient to the slots that hold the max, split between ties (equal only for
            # equal feature rows, whose parameter gradients are then the same as one slot's); a max
            # of 0 passes nothing (the ReLU below)
            zc, pc = z.view(e - s, M, H), pooled[s:e, None, :]
            at_max = (zc == pc).to(z.dtype)
            share = g_pooled[s:e, None, :] / at_max.sum(dim=1, keepdim=True).clamp_(min=1.0)
            gz.view(e - s, M, H).addcmul_(at_max, share)
            gz = torch.ops.aten.threshold_backward(gz, z, 0.0)  # ReLU: gradient where z > 0
            g_w.addmm_(gz.t(), xc)
        return None, None, g_w[:, :-1], g_w[:, -1], g_w2[None, :], g_logits.sum().reshape(1)


def slot_scores(feats: Tensor, filled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """feats (B, M, F) fixed, filled (B, M) bool, the slot layer w1 (H, F), b1 (H,) and the output
    layer w2 (1, H), b2 (1,) -> (repeat logit per slot (B, M), -inf at empty slots; the max over the
    filled slots of relu(feats W1^T + b1), (B, H), 0 where none is filled or every unit is <= 0)."""
    if feats.requires_grad:
        raise ValueError("slot_scores treats the slot features as fixed inputs (no gradient)")
    return _SlotScorer.apply(feats.contiguous(), filled, w1, b1, w2, b2)
