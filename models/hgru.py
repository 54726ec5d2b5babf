"""HGRU (Quadrana et al. 2017, HRNN [23] in the HierTCN slides; HGRU in seed 003).

Hidden-state surgery: a session-level GRU reads the final in-session hidden state when a session
ends, and initialises the next session's in-session GRU as g0 = tanh(W s + b). Offline the
session GRU needs the previous session's last hidden state, so the forward is one loop over time
steps with both recurrences batched over the users (the streaming `cell`, over (B, T) at once):
T steps per batch, where a loop over session indexes ran each index's in-session GRU packed and
took the sum over indexes of the longest session (the 1M-event log: 331 steps a batch against a
padded length of 79, docs/MODELS.md "Training speed"). The in-session GRU's input projection
runs once for all steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livemb.models.base import SeqModel, SeqOut, register
from livemb.models.layers import session_layout


@register
class HGRU(SeqModel):
    name = "hgru"
    gate_field = "s"  # the session-level GRU state

    def __init__(self, cfg, item_vectors):
        super().__init__(cfg, item_vectors)
        in_dim = cfg.dim + cfg.etype_dim
        self.inner = nn.GRU(in_dim, cfg.channels, batch_first=True)
        self.session_gru = nn.GRU(cfg.channels, cfg.hidden, batch_first=True)
        self.init_inner = nn.Linear(cfg.hidden, cfg.channels)
        self.out = nn.Linear(cfg.channels, cfg.dim)

    def model_state_spec(self):
        return {"s": ((self.cfg.hidden,), torch.float32), "g": ((self.cfg.channels,), torch.float32)}

    def cell(self, st, inp, item, etype, new_session, level):
        close = new_session & (st["session"] >= 0)
        s_closed = self.session_gru(st["g"][:, None], st["s"][None].contiguous())[1][0]
        s = torch.where(close[:, None], s_closed, st["s"])
        g = torch.where(new_session[:, None], torch.tanh(self.init_inner(s)), st["g"])
        g = self.inner(inp[:, None], g[None].contiguous())[1][0]
        return {"s": s, "g": g}, self.out(g)

    def forward_seq(self, inp, item, new_session, level, mask):
        B, T, _ = inp.shape
        sess, _, _, _ = session_layout(new_session, mask)
        # a run starts where the session index changes (and at t = 0): the layout's sessions exactly
        start = torch.ones_like(mask)
        start[:, 1:] = sess[:, 1:] != sess[:, :-1]
        start = (start & mask)[..., None]  # (B, T, 1)
        close = start.clone()
        close[:, 0] = False  # nothing to absorb before a chunk's first session (streaming: session < 0)
        inner = self.inner
        # every step's input projection in one product; unbind, not xi[:, t]: the backward of T
        # selects zero-fills a (B, T, 3C) gradient per step, of one unbind a single stack
        xi = F.linear(inp, inner.weight_ih_l0, inner.bias_ih_l0).unbind(1)  # T x (B, 3C)
        starts, closes = start.unbind(1), close.unbind(1)
        sg = self.session_gru
        s = inp.new_zeros(B, self.cfg.hidden)
        g = inp.new_zeros(B, self.cfg.channels)
        outs, conds = [], []
        for t in range(T):
            # a session ends: the session GRU absorbs its last in-session state; the next one starts from s
            s_closed = torch.gru_cell(g, s, sg.weight_ih_l0, sg.weight_hh_l0, sg.bias_ih_l0, sg.bias_hh_l0)
            s = torch.where(closes[t], s_closed, s)
            g = torch.where(starts[t], torch.tanh(self.init_inner(s)), g)
            g = _gru_step(xi[t], g, inner.weight_hh_l0, inner.bias_hh_l0)
            outs.append(g)
            conds.append(s)
        g_all = torch.stack(outs, 1) * mask[..., None]  # (B, T, C); padding 0, as the streaming state never steps it
        return SeqOut(self.out(g_all), gate=torch.stack(conds, 1))  # gate: s at each event's session start


def _gru_step(xi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step from a precomputed input projection xi = W_ih x + b_ih (B, 3C); torch's gate
    order (reset, update, new), the formula of nn.GRU."""
    xr, xz, xn = xi.chunk(3, dim=1)
    hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return n + z * (h - n)  # (1 - z) n + z h
