"""Building blocks shared by the models: a causal dilated TCN and session reshaping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalTCN(nn.Module):
    """Residual stack of causal dilated 1-D convolutions (Bai et al. 2018), masked.

    `valid` (B, T) marks real positions; invalid positions are zeroed after every layer. With
    `segment` (B, T) (session ids), a tap never reads across a segment boundary, so one pass over a
    flat sequence equals a separate pass per session (no (B, S, L) grid, no padding waste). This is
    what makes the streaming window recomputation (one segment, zero padded) equal the offline pass.
    Receptive field R = 1 + (kernel - 1) * sum(dilations). The convolution is written as one matmul
    per tap (W_j h_{t - j d}), which is what lets a tap be masked per position.
    """

    def __init__(self, in_dim: int, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.kernel, self.dilations = kernel, dilations
        self.inp = nn.Linear(in_dim, channels)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d) for d in dilations)

    def forward(self, x: Tensor, valid: Tensor, segment: Tensor | None = None) -> Tensor:
        return self.body(self.inp(x), valid, segment)

    def body(self, h: Tensor, valid: Tensor, segment: Tensor | None = None) -> Tensor:
        """The residual stack on already projected inputs h (B, T, C) (= self.inp(x))."""
        B, T, _ = h.shape
        keep = valid[..., None].to(h.dtype)  # (B, T, 1)
        h = h * keep  # (B, T, C)
        for conv, d in zip(self.convs, self.dilations, strict=True):
            w = conv.weight  # (C_out, C_in, k); tap k-1 reads lag 0, tap k-1-j reads lag j*d
            acc = F.linear(h, w[:, :, self.kernel - 1], conv.bias)
            for j in range(1, self.kernel):
                lag = j * d
                if lag >= T:
                    break
                past = F.pad(h[:, : T - lag], (0, 0, lag, 0))  # (B, T, C): h_{t - lag}, zero before 0
                if segment is not None:
                    same = F.pad(segment[:, lag:] == segment[:, : T - lag], (lag, 0))  # (B, T)
                    past = past * same[..., None].to(h.dtype)
                acc = acc + F.linear(past, w[:, :, self.kernel - 1 - j])
            h = (h + F.relu(acc)) * keep
        return h  # (B, T, C)


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


def session_runs(segment: Tensor, valid: Tensor, S: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sessions of a flat (B, T) layout as padded runs, for packed recurrences (no padding steps).

    segment (B, T) session index per event, valid (B, T). Returns, for the R sessions that have
    events (ordered by user, then session): idx (R, L) flat positions b * T + t (0 at padding),
    keep (R, L) the real positions, lengths (R,) and owner (R,) = b * S + session."""
    B, T = segment.shape
    t = torch.arange(T, device=segment.device).expand(B, T)
    owner_all = (torch.arange(B, device=segment.device)[:, None] * S + segment)[valid]  # (E,)
    length = torch.zeros(B * S, dtype=torch.long, device=segment.device).index_add_(
        0, owner_all, torch.ones_like(owner_all))
    start = torch.zeros(B * S, dtype=torch.long, device=segment.device).scatter_reduce_(
        0, owner_all, t[valid], "amin", include_self=False)  # a session's events are contiguous in t
    owner = length.nonzero().squeeze(1)
    lengths = length[owner]
    steps = torch.arange(int(lengths.max()) if len(lengths) else 1, device=segment.device)
    keep = steps[None, :] < lengths[:, None]
    idx = (torch.div(owner, S, rounding_mode="floor") * T + start[owner])[:, None] + steps[None, :]
    return idx.masked_fill(~keep, 0), keep, lengths, owner


def per_event(x: Tensor, segment: Tensor) -> Tensor:
    """Gather per-session values x (B, S, F) to every event of its session: (B, T, F).

    One index_select on the flattened (B * S, F) rows: its backward is an index_add, much cheaper
    on CPU than the sorting index_put that x[b, segment] backpropagates through."""
    B, S, _ = x.shape
    rows = (torch.arange(B, device=x.device)[:, None] * S + segment).reshape(-1)  # (B * T,)
    return x.reshape(B * S, -1).index_select(0, rows).view(*segment.shape, -1)


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
