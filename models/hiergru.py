"""HierGRU (HierTCN paper's ablation): the same session hierarchy with a GRU inside the session.

The in-session GRU starts from zeros at every session and reads [item ; event type ; h]."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import register
from models.hierarchy import HierarchicalModel


@register
class HierGRU(HierarchicalModel):
    name = "hiergru"

    def __init__(self, cfg, item_vectors):
        super().__init__(cfg, item_vectors)
        self.inner = nn.GRU(self.in_dim + cfg.hidden, cfg.channels, batch_first=True)

    def encoder_state_spec(self):
        return {"g": ((self.cfg.channels,), torch.float32)}

    def encode_seq(self, x: Tensor, cond: Tensor, valid: Tensor) -> Tensor:
        N, L, _ = x.shape
        out, _ = self.inner(torch.cat([x, cond[:, None, :].expand(N, L, -1)], dim=-1))
        return out

    def encode_step(self, st, inp, item, etype, h, new_session):
        g = torch.where(new_session[:, None], torch.zeros_like(st["g"]), st["g"])
        g = self.inner(torch.cat([inp, h], dim=-1)[:, None], g[None].contiguous())[1][0]
        return {"g": g}, g
