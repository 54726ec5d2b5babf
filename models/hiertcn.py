"""HierTCN (You et al., WWW 2019): long-term GRU across sessions + causal dilated TCN within one.

The TCN input at each position is [item vector ; event-type embedding ; h], h being the long-term
state before the session. Streaming keeps the last R-1 events of the open session (R = receptive
field) and recomputes the TCN over that window: with per-layer masking this equals the offline
pass exactly (see models/layers.CausalTCN) at a cost of O(R) per event and 2*(R-1) ints of state.

Call map (follow HierTCN from this file outward):

    streaming  SeqModel.step (base.py: session flags, loop over the batch's events, memory update)
                 -> HierarchicalModel.cell (hierarchy.py: fold a closed session into h by long_gru)
                      -> HierTCN.encode_step (here: shift the window, recompute the TCN on it)
                           -> CausalTCN.forward (layers.py, one segment)
                 -> u = out([o ; h])
    offline    SeqModel.forward_full (base.py) -> HierarchicalModel.forward_seq (hierarchy.py:
                 per-session AGG by scatter, long_gru over sessions, h gathered per event)
                   -> HierTCN.encode_flat (here) -> CausalTCN.forward(segment=session ids)
                 -> SeqOut(u, starts = out([0 ; h]), gate = h)
    scoring    SeqModel.scores / memory_scores (base.py) -> repeat.MixtureHead (repeat.py)
    training   models/train.py batch_loss -> forward_full + memory_scores (mixture NLL)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from livemb.models.base import register
from livemb.models.hierarchy import HierarchicalModel
from livemb.models.layers import CausalTCN, per_event


@register
class HierTCN(HierarchicalModel):
    name = "hiertcn"

    def __init__(self, cfg, item_vectors):
        super().__init__(cfg, item_vectors)
        self.tcn = CausalTCN(self.in_dim + cfg.hidden, cfg.channels, cfg.kernel, cfg.dilations)
        self.window = cfg.receptive_field - 1

    def encoder_state_spec(self):
        return {"win_item": ((self.window,), torch.int64), "win_etype": ((self.window,), torch.int8)}

    def encode_seq(self, x: Tensor, cond: Tensor, valid: Tensor) -> Tensor:
        N, L, _ = x.shape
        return self.tcn(torch.cat([x, cond[:, None, :].expand(N, L, -1)], dim=-1), valid)

    def encode_flat(self, x: Tensor, cond: Tensor, valid: Tensor, segment: Tensor) -> Tensor:
        # inp([x ; h]) = W_x x + (W_h h + b): the h part is per session, so project it once per
        # session (cond is (B, S, H) here) and gather it per event
        w = self.tcn.inp.weight  # (C, in_dim + H)
        h_part = F.linear(cond, w[:, self.in_dim :], self.tcn.inp.bias)  # (B, S, C)
        proj = F.linear(x, w[:, : self.in_dim]) + per_event(h_part, segment)
        return self.tcn.body(proj, valid, segment)

    def encode_step(self, st, inp, item, etype, h, new_session):
        B, W = st["win_item"].shape
        win_item = torch.where(new_session[:, None], torch.zeros_like(st["win_item"]), st["win_item"])
        win_etype = torch.where(new_session[:, None], torch.zeros_like(st["win_etype"]), st["win_etype"])
        items = torch.cat([win_item.long(), item[:, None]], dim=1)  # (B, R)
        etypes = torch.cat([win_etype.long(), etype[:, None]], dim=1)
        sess_len = torch.where(new_session, torch.ones_like(st["sess_len"]), st["sess_len"] + 1)
        valid = torch.arange(W + 1, device=items.device)[None, :] >= (W + 1 - sess_len)[:, None]  # (B, R)
        o = self.encode_seq(self.inputs(items, etypes), h, valid)[:, -1]  # (B, C)
        return {"win_item": items[:, 1:], "win_etype": etypes[:, 1:].to(torch.int8)}, o
