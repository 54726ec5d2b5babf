"""HRNN-meta (Ma et al., seed 003): one flat GRU whose input carries the hierarchy as data.

Input = [item vector ; event-type embedding ; session-start bit ; time-delta level embedding].
No hidden-state surgery, so the offline pass is one cuDNN-friendly GRU call over whole histories.
"""

from __future__ import annotations

import torch
from torch import nn

from livemb.models.base import SeqModel, SeqOut, register

_LEVEL_DIM = 4


@register
class HRNN(SeqModel):
    name = "hrnn"
    gate_field = "g"

    def __init__(self, cfg, item_vectors):
        super().__init__(cfg, item_vectors)
        self.level_emb = nn.Embedding(cfg.dt_buckets, _LEVEL_DIM)
        self.gru = nn.GRU(cfg.dim + cfg.etype_dim + 1 + _LEVEL_DIM, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.hidden, cfg.dim)

    def model_state_spec(self):
        return {"g": ((self.cfg.hidden,), torch.float32)}

    def _control(self, inp, new_session, level):
        return torch.cat([inp, new_session.to(inp.dtype)[..., None], self.level_emb(level)], dim=-1)

    def cell(self, st, inp, item, etype, new_session, level):
        g = self.gru(self._control(inp, new_session, level)[:, None], st["g"][None].contiguous())[1][0]
        return {"g": g}, self.out(g)

    def forward_seq(self, inp, item, new_session, level, mask):
        out, _ = self.gru(self._control(inp, new_session, level))
        return SeqOut(self.out(out), gate=out)
