"""Building blocks shared by the models: a causal dilated TCN and session reshaping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalTCN(nn.Module):
    """Residual stack of causal dilated 1-D convolutions (Bai et al. 2018), masked.

    `valid` (B, T) marks real positions. Invalid positions are zeroed after every layer, so a
    window that starts before the session start sees exactly the zero padding the full-sequence
    forward sees: this is what makes the streaming window recomputation equal the offline pass.
    Receptive field R = 1 + (kernel - 1) * sum(dilations).
    """

    def __init__(self, in_dim: int, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.kernel, self.dilations = kernel, dilations
        self.inp = nn.Linear(in_dim, channels)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d) for d in dilations)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        B, T, _ = x.shape
        keep = valid[:, None, :].to(x.dtype)  # (B, 1, T)
        h = self.inp(x).transpose(1, 2) * keep  # (B, C, T)
        for conv, d in zip(self.convs, self.dilations, strict=True):
            pad = (self.kernel - 1) * d
            h = (h + F.relu(conv(F.pad(h, (pad, 0))))) * keep
        return h.transpose(1, 2)  # (B, T, C)


def session_layout(new_session: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """Where each event of a flat (B, T) sequence sits in a (B, S, L) session grid.

    Returns session index (B, T), position in session (B, T), S and L. Padding positions get
    index 0/position 0 and must be ignored via `mask`.
    """
    B, T = mask.shape
    sess = (new_session.long().cumsum(dim=1) - 1).clamp(min=0) * mask
    t = torch.arange(T, device=mask.device).expand(B, T)
    # position = t - (index of the latest session start at or before t)
    start = torch.where(new_session, t, torch.zeros_like(t)).cummax(dim=1).values
    pos = (t - start) * mask
    S = int(sess.max()) + 1 if mask.any() else 1
    L = int(pos.max()) + 1 if mask.any() else 1
    return sess, pos, S, L


def to_grid(x: Tensor, sess: Tensor, pos: Tensor, mask: Tensor, S: int, L: int) -> Tensor:
    """Scatter flat (B, T, ...) values into a zero (B, S, L, ...) grid."""
    B = x.shape[0]
    grid = x.new_zeros((B, S, L, *x.shape[2:]))
    b = torch.arange(B, device=x.device)[:, None].expand_as(sess)
    grid[b[mask], sess[mask], pos[mask]] = x[mask]
    return grid


def from_grid(grid: Tensor, sess: Tensor, pos: Tensor) -> Tensor:
    """Gather a (B, S, L, ...) grid back to flat (B, T, ...)."""
    b = torch.arange(grid.shape[0], device=grid.device)[:, None].expand_as(sess)
    return grid[b, sess, pos]
