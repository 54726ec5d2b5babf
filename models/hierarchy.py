"""The session hierarchy shared by HierTCN and HierGRU (HierTCN paper, section 3).

A long-term GRU advances once per finished session on AGG(session); the in-session encoder runs
on the session's events conditioned on the long-term state left by the previous sessions, and the
output u_t = W [o_t ; h] lives in item space.

AGG is a config choice: "items" (mean of the session's known item vectors) lets the offline pass
run the long-term GRU over all sessions first and then every session's encoder in one parallel
batch; "outputs" (mean of the encoder outputs, closer to the paper's figure) makes the offline pass
loop over sessions. docs/MODELS.md has the measurement.

Streaming state: h (H) long-term state, agg_sum/agg_n the running aggregate of the open session,
plus the encoder's own state. The open session is folded into h when the next session's first
event arrives (a break is only known then).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livemb.models.base import ModelConfig, SeqModel, SeqOut
from livemb.models.layers import from_grid, per_event, session_layout, to_grid


class HierarchicalModel(SeqModel):
    gate_field = "h"  # the repeat gate reads the long-term GRU state

    def __init__(self, cfg: ModelConfig, item_vectors):
        super().__init__(cfg, item_vectors)
        if cfg.agg not in ("items", "outputs"):
            raise ValueError(f"agg must be 'items' or 'outputs', got {cfg.agg!r}")
        self.in_dim = cfg.dim + cfg.etype_dim
        self.agg_dim = cfg.dim if cfg.agg == "items" else cfg.channels
        self.h0 = nn.Parameter(torch.zeros(cfg.hidden))
        self.long_gru = nn.GRU(self.agg_dim, cfg.hidden, batch_first=True)
        self.out = nn.Linear(cfg.channels + cfg.hidden, cfg.dim)

    # -- the in-session encoder (subclasses) ---------------------------------------------
    def encoder_state_spec(self) -> dict:
        return {}

    def encode_seq(self, x: Tensor, cond: Tensor, valid: Tensor) -> Tensor:
        """(N, L, in_dim) session inputs, (N, H) condition, (N, L) valid -> (N, L, C)."""
        raise NotImplementedError

    def encode_step(self, st: dict, inp: Tensor, item: Tensor, etype: Tensor, h: Tensor, new_session: Tensor) -> tuple[dict, Tensor]:
        """One event: returns the encoder's updated state tensors and o (B, C)."""
        raise NotImplementedError

    # -- SeqModel hooks ---------------------------------------------------------------------
    def model_state_spec(self):
        spec = {
            "h": ((self.cfg.hidden,), torch.float32),
            "agg_sum": ((self.agg_dim,), torch.float32),
            "agg_n": ((), torch.float32),
        }
        spec.update(self.encoder_state_spec())
        return spec

    def init_model_state(self, B, device):
        st = super().init_model_state(B, device)
        st["h"] = self.h0.detach().expand(B, -1).clone()
        return st

    def _agg_input(self, inp: Tensor, o: Tensor, item: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.agg == "items":
            known = (item > 0).to(inp.dtype)
            return inp[..., : self.cfg.dim] * known[..., None], known
        return o, torch.ones_like(o[..., 0])

    def cell(self, st, inp, item, etype, new_session, level):
        close = new_session & (st["session"] >= 0)  # a previous session exists and just ended
        if close.any():  # most live events continue a session: no long-term step to take
            agg = st["agg_sum"] / st["agg_n"].clamp(min=1.0)[:, None]
            h_closed = self.long_gru(agg[:, None, :], st["h"][None])[1][0]
            h = torch.where(close[:, None], h_closed, st["h"])
        else:
            h = st["h"]
        agg_sum = torch.where(new_session[:, None], torch.zeros_like(st["agg_sum"]), st["agg_sum"])
        agg_n = torch.where(new_session, torch.zeros_like(st["agg_n"]), st["agg_n"])
        enc_st, o = self.encode_step(st, inp, item, etype, h, new_session)
        a, n = self._agg_input(inp, o, item)
        u = self.out(torch.cat([o, h], dim=-1))
        return {"h": h, "agg_sum": agg_sum + a, "agg_n": agg_n + n, **enc_st}, u

    def encode_flat(self, x: Tensor, cond: Tensor, valid: Tensor, segment: Tensor) -> Tensor | None:
        """Optional fast path: the encoder over flat (B, T) sequences with session ids `segment`
        (B, T) and the per-session condition cond (B, S, H) -> (B, T, C); None: use the session grid."""
        return None

    def forward_seq(self, inp, item, new_session, level, mask):
        B, T = item.shape
        sess, pos, S, L = session_layout(new_session, mask)
        h0 = self.h0.expand(B, -1)
        b_idx = torch.arange(B, device=inp.device)[:, None]
        if self.cfg.agg == "items":
            # AGG per session by one scatter over the flat sequence (no grid): (B, S, D)
            known = ((item > 0) & mask).to(inp.dtype)
            flat_sess = (b_idx * S + sess).reshape(-1)
            xs = (inp[..., : self.cfg.dim] * known[..., None]).reshape(B * T, -1)
            tot = inp.new_zeros(B * S, self.cfg.dim).index_add_(0, flat_sess, xs)
            cnt = inp.new_zeros(B * S).index_add_(0, flat_sess, known.reshape(-1))
            agg = (tot / cnt.clamp(min=1)[:, None]).view(B, S, -1)
            h_after, _ = self.long_gru(agg, h0[None].contiguous())  # (B, S, H): after session s
            cond = torch.cat([h0[:, None], h_after[:, :-1]], dim=1)  # (B, S, H): before session s
            cond_t = per_event(cond, sess)  # (B, T, H)
            o = self.encode_flat(inp, cond, mask, sess)
            if o is None:
                x = to_grid(inp, sess, pos, mask, S, L)  # (B, S, L, in_dim)
                valid = to_grid(mask, sess, pos, mask, S, L)
                o = self.encode_seq(x.reshape(B * S, L, -1), cond.reshape(B * S, -1), valid.reshape(B * S, L))
                o = from_grid(o.view(B, S, L, -1), sess, pos)  # (B, T, C)
        else:
            x = to_grid(inp, sess, pos, mask, S, L)
            valid = to_grid(mask, sess, pos, mask, S, L)
            h, outs, conds = h0, [], []
            for s in range(S):
                o_s = self.encode_seq(x[:, s], h, valid[:, s])  # (B, L, C)
                outs.append(o_s)
                conds.append(h)
                v = valid[:, s].to(o_s.dtype)[..., None]
                agg = (o_s * v).sum(1) / v.sum(1).clamp(min=1)
                h = self.long_gru(agg[:, None], h[None].contiguous())[1][0]
            o, cond = from_grid(torch.stack(outs, 1), sess, pos), torch.stack(conds, 1)
            cond_t = per_event(cond, sess)
        # out([o ; h]) = W_o o + (W_h h + b), the h part projected once per session (B, S, D) and
        # gathered once: it is also the query-time session start, out([0 ; h before that session])
        w = self.out.weight  # (D, C + H)
        start = per_event(F.linear(cond, w[:, self.cfg.channels :], self.out.bias), sess)  # (B, T, D)
        u = F.linear(o, w[:, : self.cfg.channels]) + start
        return SeqOut(u, starts=start, gate=cond_t)

    def _start_embedding(self, h: Tensor) -> Tensor:
        """out([0 ; h]) = W_h h + b: the embedding before a session's first event."""
        return F.linear(h, self.out.weight[:, self.cfg.channels :], self.out.bias)

    def next_session_embedding(self, st: dict[str, Tensor]) -> Tensor:
        """(B, D): the embedding if the user's next event opens a new session (the open session is
        folded into h first). Lets the hierarchy act at a session's first target, which the
        in-session embedding cannot know is coming (seed 003's query-time control)."""
        agg = st["agg_sum"] / st["agg_n"].clamp(min=1.0)[:, None]
        h_closed = self.long_gru(agg[:, None, :], st["h"][None].contiguous())[1][0]
        h = torch.where((st["session"] >= 0)[:, None], h_closed, st["h"])
        return self._start_embedding(h)
