"""Parameter-free embedding baselines: MV (mean item vector of the history) and last item."""

from __future__ import annotations

import torch

from livemb.models.base import SeqModel, SeqOut, register


@register
class MovingAverage(SeqModel):
    """MV of the HierTCN paper: u = mean of the vectors of every known item the user touched."""

    name = "mv"
    trainable = False

    def model_state_spec(self):
        return {"sum": ((self.cfg.dim,), torch.float32), "n": ((), torch.float32)}

    def cell(self, st, inp, item, etype, new_session, level):
        known = (item > 0).float()
        total = st["sum"] + inp[:, : self.cfg.dim] * known[:, None]
        n = st["n"] + known
        return {"sum": total, "n": n}, total / n.clamp(min=1.0)[:, None]

    def forward_seq(self, inp, item, new_session, level, mask):
        known = ((item > 0) & mask).float()
        total = (inp[..., : self.cfg.dim] * known[..., None]).cumsum(1)
        return SeqOut(total / known.cumsum(1).clamp(min=1.0)[..., None])


@register
class LastItem(SeqModel):
    """u = vector of the last known item."""

    name = "last"
    trainable = False

    def model_state_spec(self):
        return {"v": ((self.cfg.dim,), torch.float32)}

    def cell(self, st, inp, item, etype, new_session, level):
        v = torch.where((item > 0)[:, None], inp[:, : self.cfg.dim], st["v"])
        return {"v": v}, v

    def forward_seq(self, inp, item, new_session, level, mask):
        B, T = item.shape
        known = (item > 0) & mask
        t = torch.arange(T, device=item.device).expand(B, T)
        last = torch.where(known, t, torch.full_like(t, -1)).cummax(1).values  # latest known position
        x = inp[..., : self.cfg.dim]
        v = x[torch.arange(B)[:, None], last.clamp(min=0)]
        return SeqOut(v * (last >= 0)[..., None])
