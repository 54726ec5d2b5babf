"""HGRU (Quadrana et al. 2017, HRNN [23] in the HierTCN slides; HGRU in seed 003).

Hidden-state surgery: a session-level GRU reads the final in-session hidden state when a session
ends, and initialises the next session's in-session GRU as g0 = tanh(W s + b). Offline this forces
a loop over sessions (the session GRU needs the previous session's last hidden state); each step
runs the in-session GRU packed over the users that have that session, so no step runs on padding
(a (B, S, L) grid padded every session to the longest one: 3x the flat GRU's epoch on e-commerce logs).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from livemb.models.base import SeqModel, SeqOut, register
from livemb.models.layers import session_layout, session_runs


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
        sess, _, S, _ = session_layout(new_session, mask)
        idx, keep, lengths, owner = session_runs(sess, mask, S)
        k_of, user_of = owner % S, torch.div(owner, S, rounding_mode="floor")
        flat_inp = inp.reshape(B * T, -1)
        s = inp.new_zeros(B, self.cfg.hidden)
        conds, outs, where = [], [], []
        for k in range(S):
            conds.append(s)
            # only the users that have a k-th session, packed: no step runs on padding
            runs = (k_of == k).nonzero().squeeze(1)
            rows, n_k = user_of[runs], lengths[runs]
            L_k = int(n_k.max())
            x_k = flat_inp[idx[runs, :L_k]]  # (R, L_k, in); padding repeats event 0 and is skipped
            g0 = torch.tanh(self.init_inner(s[rows]))
            packed = pack_padded_sequence(x_k, n_k.cpu(), batch_first=True, enforce_sorted=False)
            o, last = self.inner(packed, g0[None].contiguous())  # last: hidden after each session's last event
            real = keep[runs, :L_k]
            outs.append(pad_packed_sequence(o, batch_first=True)[0][real])
            where.append(idx[runs, :L_k][real])
            s = s.index_copy(0, rows, self.session_gru(last[0][:, None], s[rows][None].contiguous())[1][0])
        g = inp.new_zeros(B * T, self.cfg.channels).index_copy(0, torch.cat(where), torch.cat(outs)).view(B, T, -1)
        gate = torch.stack(conds, 1)[torch.arange(B, device=inp.device)[:, None], sess]  # (B, T, H)
        return SeqOut(self.out(g), gate=gate)
