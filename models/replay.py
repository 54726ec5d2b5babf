"""Replays shared by training, validation and evaluation: what depends on the data alone or on one
offline forward, computed once.

`MemoryCache`: the recent-items memory after every event of a set of sequences, replayed by the
streaming update (so it equals the live memory). `next_item_predictions`: the embedding that
predicts each next event, from the offline forward (equal to the streaming step's: the parity tests).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from livemb.models import repeat
from livemb.models.base import EventBatch, SeqModel, session_flags

Sequence = tuple[np.ndarray, np.ndarray, np.ndarray]  # items (1-based, 0 unknown), event types, ts ms


class MemoryCache:
    """The recent-items memory after every event of every training chunk, replayed ONCE.

    The memory depends on the data only (not on parameters), so it is computed by the streaming
    update (repeat.update_memory, hence exactly the features serving computes) for all chunks at
    once before the first epoch, in groups of similar length, and each batch gathers its rows.
    Storage: one (E, M) tensor per memory field in its compact dtype (24 bytes a slot), E = events;
    for a model that reads the category context, its slot counts too (repeat.category_counts,
    12 bytes a slot: data only, and per batch its sort took ~27 ms of a 6,400-position training step).
    """

    def __init__(self, model: SeqModel, chunks: list[Sequence], group: int = 4096):
        lengths = np.fromiter((len(c[0]) for c in chunks), np.int64, len(chunks))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        E = int(lengths.sum())
        M = model.cfg.recent_items
        self.fields = {k: torch.zeros((E, *shape), dtype=dt) for k, (shape, dt) in repeat.memory_spec(M).items()}
        self.common = {k: torch.zeros(E, dtype=torch.int64) for k in ("n_events", "last_ts", "session")}
        gap = model.cfg.session_gap_ms
        order = np.argsort(lengths, kind="stable")
        for g0 in range(0, len(order), group):
            ids = order[g0 : g0 + group]
            ev = EventBatch.from_sequences(*zip(*(chunks[i] for i in ids), strict=True))
            B, T = ev.item.shape
            last = torch.full((B,), -1, dtype=torch.int64)
            session = session_flags(ev.ts, ev.mask, last, gap, model.cfg.dt_buckets)[0].long().cumsum(1) - 1
            flat = torch.from_numpy(self.offsets[ids])[:, None] + torch.arange(T)[None, :]  # (B, T)
            self.common["n_events"][flat[ev.mask]] = (torch.arange(T) + 1).expand(B, T)[ev.mask]
            self.common["last_ts"][flat[ev.mask]] = ev.ts.cummax(1).values[ev.mask]
            self.common["session"][flat[ev.mask]] = session[ev.mask]
            mem = repeat.init_memory(B, M, torch.device("cpu"))
            for t in range(T):
                m = ev.mask[:, t]
                upd = repeat.update_memory(mem, ev.item[:, t], ev.ts[:, t], ev.etype[:, t], session[:, t], torch.full_like(last, t))
                mem = {k: torch.where(m[:, None], upd[k], mem[k]) for k in mem}
                rows = flat[m, t]
                for k in mem:
                    self.fields[k][rows] = mem[k][m]
        self.counts = None  # (E, M, 3) int32 repeat.category_counts, for a model that reads them
        if model.cfg.item_categories and model.cfg.category_context:
            counts = torch.zeros((E, M, 3), dtype=torch.int32)
            for r0 in range(0, E, group):
                rows = torch.arange(r0, min(r0 + group, E))
                counts[rows] = model.slot_category_counts(self.state_at(rows, model.device)).cpu()
            self.counts = counts

    def rows(self, chunk_ids: list[int], T: int) -> Tensor:
        """(B, T) flat row index of each (chunk, position); positions past a chunk's end are junk, mask them."""
        off = torch.from_numpy(self.offsets[np.asarray(chunk_ids)])
        return (off[:, None] + torch.arange(T)[None, :]).clamp(max=len(self.common["n_events"]) - 1)

    def state_at(self, rows: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The memory state (n, M) and its clocks (n,) after the events at flat `rows` (n,)."""
        out = {k: v[rows].to(device) for k, v in self.fields.items()}
        out.update({k: v[rows].to(device) for k, v in self.common.items()})
        if self.counts is not None:
            out[repeat.CONTEXT_FIELD] = self.counts[rows].to(device)
        return out


def next_item_predictions(model: SeqModel, ev: EventBatch) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Prediction for each next event: (pred (B, T-1, D), gate (B, T-1, G) or None, sel (B, T-1), target)."""
    out = model.forward_full(ev)
    target = ev.item[:, 1:]
    sel = ev.mask[:, 1:] & (target > 0)  # positions with a known next item
    pred = out.u[:, :-1]
    if out.starts is not None:  # a target that opens a session is predicted by the session-start embedding
        last = torch.full((ev.item.shape[0],), -1, dtype=torch.int64, device=ev.item.device)
        opens = session_flags(ev.ts, ev.mask, last, model.cfg.session_gap_ms, model.cfg.dt_buckets)[0][:, 1:]
        pred = torch.where(opens[..., None], out.starts[:, 1:], pred)
    gate = None if out.gate is None else out.gate[:, :-1]
    return pred, gate, sel, target


def first_seen_ms(seqs: list[Sequence], n_items: int) -> Tensor:
    """(N+1,) int64: the earliest time each item occurs in `seqs` (int64 max for items that never
    do). A target at time t with first_seen[item] >= t is its item's first occurrence: a new item,
    which a catalogue built from the past cannot hold (TrainConfig.gate_on_known)."""
    out = np.full(n_items + 1, np.iinfo(np.int64).max, np.int64)
    for it, _, ts in seqs:
        np.minimum.at(out, it, ts)
    return torch.from_numpy(out)
