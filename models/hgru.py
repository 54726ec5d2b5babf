"""HGRU (Quadrana et al. 2017, HRNN [23] in the HierTCN slides; HGRU in seed 003).

Hidden-state surgery: a session-level GRU reads the final in-session hidden state when a session
ends, and initialises the next session's in-session GRU as g0 = tanh(W s + b). Offline this forces
a loop over sessions (the session GRU needs the previous session's last hidden state).
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import SeqModel, SeqOut, register
from models.layers import from_grid, session_layout, to_grid


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
        B = inp.shape[0]
        sess, pos, S, L = session_layout(new_session, mask)
        x = to_grid(inp, sess, pos, mask, S, L)
        length = to_grid(mask, sess, pos, mask, S, L).sum(2)  # (B, S)
        s = inp.new_zeros(B, self.cfg.hidden)
        outs, conds = [], []
        for k in range(S):
            conds.append(s)
            g0 = torch.tanh(self.init_inner(s))
            o, _ = self.inner(x[:, k], g0[None].contiguous())  # (B, L, C)
            outs.append(o)
            last = o[torch.arange(B), (length[:, k] - 1).clamp(min=0)]  # hidden after the session's last event
            s = self.session_gru(last[:, None], s[None].contiguous())[1][0]
        g = torch.stack(outs, 1)  # (B, S, L, C)
        gate = torch.stack(conds, 1)[torch.arange(B, device=inp.device)[:, None], sess]  # (B, T, H)
        return SeqOut(from_grid(self.out(g), sess, pos), gate=gate)
