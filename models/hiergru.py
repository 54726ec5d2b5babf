"""HierGRU (HierTCN paper's ablation): the same session hierarchy with a GRU inside the session.

The in-session GRU starts from zeros at every session and reads [item ; event type ; h]."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from livemb.models.base import register
from livemb.models.hierarchy import HierarchicalModel
from livemb.models.layers import session_runs


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

    def encode_flat(self, x: Tensor, cond: Tensor, valid: Tensor, segment: Tensor) -> Tensor:
        # every session of every user is one packed sequence (h is known before the session):
        # one GRU call, no step on padding (the (B, S, L) grid padded each session to the longest)
        B, T, _ = x.shape
        S = cond.shape[1]
        idx, keep, lengths, owner = session_runs(segment, valid, S)
        h = cond.reshape(B * S, -1)[owner][:, None, :].expand(-1, idx.shape[1], -1)  # (R, L, H)
        inp = torch.cat([x.reshape(B * T, -1)[idx], h], dim=-1)  # (R, L, in_dim + H)
        packed = pack_padded_sequence(inp, lengths.cpu(), batch_first=True, enforce_sorted=False)
        o = pad_packed_sequence(self.inner(packed)[0], batch_first=True, total_length=idx.shape[1])[0]
        return x.new_zeros(B * T, o.shape[-1]).index_copy(0, idx[keep], o[keep]).view(B, T, -1)

    def encode_step(self, st, inp, item, etype, h, new_session):
        g = torch.where(new_session[:, None], torch.zeros_like(st["g"]), st["g"])
        g = self.inner(torch.cat([inp, h], dim=-1)[:, None], g[None].contiguous())[1][0]
        return {"g": g}, g
