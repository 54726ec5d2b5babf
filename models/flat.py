"""Flat sequence baselines that ignore sessions: GRU (GRU4Rec-style) and TCN over the whole history."""

from __future__ import annotations

import torch
from torch import nn

from livemb.models.base import SeqModel, SeqOut, register
from livemb.models.layers import CausalTCN


@register
class FlatGRU(SeqModel):
    name = "gru"
    gate_field = "g"

    def __init__(self, cfg, item_vectors):
        super().__init__(cfg, item_vectors)
        self.gru = nn.GRU(cfg.dim + cfg.etype_dim, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.hidden, cfg.dim)

    def model_state_spec(self):
        return {"g": ((self.cfg.hidden,), torch.float32)}

    def cell(self, st, inp, item, etype, new_session, level):
        g = self.gru(inp[:, None], st["g"][None].contiguous())[1][0]
        return {"g": g}, self.out(g)

    def forward_seq(self, inp, item, new_session, level, mask):
        g = self.gru(inp)[0]  # (B, T, H)
        return SeqOut(self.out(g), gate=g)


@register
class FlatTCN(SeqModel):
    """Causal dilated TCN over the last R events regardless of sessions (state: the R-1 window)."""

    name = "tcn"

    def __init__(self, cfg, item_vectors):
        super().__init__(cfg, item_vectors)
        self.tcn = CausalTCN(cfg.dim + cfg.etype_dim, cfg.channels, cfg.kernel, cfg.dilations)
        self.out = nn.Linear(cfg.channels, cfg.dim)
        self.window = cfg.receptive_field - 1

    def model_state_spec(self):
        return {"win_item": ((self.window,), torch.int64), "win_etype": ((self.window,), torch.int8)}

    def cell(self, st, inp, item, etype, new_session, level):
        W = self.window
        items = torch.cat([st["win_item"].long(), item[:, None]], dim=1)  # (B, R)
        etypes = torch.cat([st["win_etype"].long(), etype[:, None]], dim=1)
        seen = st["n_events"] + 1
        valid = torch.arange(W + 1, device=items.device)[None, :] >= (W + 1 - seen)[:, None]
        o = self.tcn(self.inputs(items, etypes), valid)[:, -1]
        return {"win_item": items[:, 1:], "win_etype": etypes[:, 1:].to(torch.int8)}, self.out(o)

    def forward_seq(self, inp, item, new_session, level, mask):
        return SeqOut(self.out(self.tcn(inp, mask)))
