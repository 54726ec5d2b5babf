"""Online quality: how the recommendations a user was last sent rank the item of their next event.

For every applied event of a user who already received a recommendation, the target is the
event's item and the list is the `candidates` of the latest `recommendations` message published
after one of that user's events (best first). Per event: hit@k for k in `KS` (the item is among
the first k candidates) and the reciprocal rank (1 / 1-based position, 0 when absent), split by
event type (the model's `EVENT_TYPES`, so the labels are bounded) and, for hits, by the hit
candidate's source: `repeat` when the item was in the user's recent-items memory when the list
was built (the repeat path scored it: the merge drops a memory item's faiss hit in favour of its
memory entry), else `explore`.

How it stays cheap and exact: the processor keeps the published list in the user's state row
(`state.codec.REC_FIELD`, the first `REC_LEN` candidates as int32 item indices, 80 bytes, remapped with the
memory on an item-table swap; the open catalogue's new items as their tags, `new_item_tags`), so an event is scored against exactly what was published, from
the stored (pre-event) row the batch already decodes: one (E, 20) comparison for the batch's E
events, no second search. A user's events of one batch are all scored against the list stored
before the batch (no message was published between them). The idle sweep's `session_closed`
messages are not stored, so they are not what is scored (docs/STREAMING.md "Online quality").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from livemb.models import newitems
from livemb.models.base import EVENT_TYPES
from livemb.state.codec import REC_FIELD

KS = (1, 5, 10, 20)  # the `k` label values of livemb_online_hits_total
SOURCES = ("repeat", "explore")  # the `source` label values
REC_LEN = max(KS)  # candidates kept per row (int32: 80 bytes)
NO_REC = -1  # REC_FIELD's fill for a user who has not been sent a list yet (never stored)


@dataclass
class OnlineQuality:
    """One batch's counts (arrays indexed by event type index; hits by [k, source, event type])."""

    targets: np.ndarray = field(default_factory=lambda: np.zeros(len(EVENT_TYPES), np.int64))
    hits: np.ndarray = field(default_factory=lambda: np.zeros((len(KS), len(SOURCES), len(EVENT_TYPES)), np.int64))
    rr_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(EVENT_TYPES), np.float64))


def ranks(rec: np.ndarray, item: np.ndarray) -> np.ndarray:
    """1-based position of item[e] in rec[e] (E, L) (its first occurrence), 0 when absent;
    the unknown item (0) and empty slots (0) never match; a new item matches by its tag."""
    eq = (rec == item[:, None]) & (item[:, None] != 0)
    return np.where(eq.any(axis=1), eq.argmax(axis=1) + 1, 0)


def score_events(rec: np.ndarray, mem: np.ndarray, user_of: np.ndarray, item: np.ndarray, etype: np.ndarray
                 ) -> OnlineQuality:
    """The batch's counts. rec (B, L): each user's stored list (`NO_REC` rows: no list yet, their
    events are not targets); mem (B, M): each user's stored memory items; per event e: its user's
    row `user_of[e]`, its item index `item[e]` (0 = unknown item) and event type index `etype[e]`.
    Vectorized over the events: a few (E, L) / (E, M) comparisons and bincounts."""
    q = OnlineQuality()
    T = len(EVENT_TYPES)
    has = rec[user_of, 0] != NO_REC
    if not has.any():
        return q
    u, it, et = user_of[has], item[has], etype[has]
    r = ranks(rec[u], it)
    q.targets += np.bincount(et, minlength=T)
    q.rr_sum += np.bincount(et, weights=np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0), minlength=T)
    hit = r > 0
    if hit.any():
        repeat = (mem[u[hit]] == it[hit][:, None]).any(axis=1)
        src = np.where(repeat, SOURCES.index("repeat"), SOURCES.index("explore"))
        cell = src * T + et[hit]  # (source, event type) of each hit
        for j, k in enumerate(KS):
            q.hits[j] += np.bincount(cell[r[hit] <= k], minlength=len(SOURCES) * T).reshape(len(SOURCES), T)
    return q


def with_rec(init: dict[str, torch.Tensor], B: int) -> dict[str, torch.Tensor]:
    """A model's initial state for B users plus `REC_FIELD` (no list yet), for `StateCodec.stack`."""
    device = init["mem_item"].device  # the codec indexes every field with one index tensor
    return {**init, REC_FIELD: torch.full((B, REC_LEN), NO_REC, dtype=torch.int32, device=device)}


def split_rec(st: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """(the model's state, the (B, REC_LEN) stored lists) of a stacked batch state."""
    rest = dict(st)
    return rest, rest.pop(REC_FIELD).cpu().numpy()


def put_rec(st: dict[str, torch.Tensor], items: np.ndarray, extension=None) -> dict[str, torch.Tensor]:
    """The state to store: the model's new state + the published candidates (B, K), as the
    (B, REC_LEN) int32 field, 0-padded (the list `score_events` will read at the next event).
    A new item of the open catalogue (a negative pool reference, models/newitems.py) is stored
    as its tag (`new_item_tags`), as is one of the new-item `extension` (models/newvectors.py)."""
    out = np.zeros((items.shape[0], REC_LEN), np.int32)
    n = min(REC_LEN, items.shape[1])
    head = items[:, :n]
    if (head < 0).any():
        ext = (extension.keys, extension.raw) if extension is not None else (None, None)
        b, k, keys, _ = newitems.ref_rows(head, st, *ext)
        head = head.copy()
        head[b, k] = new_item_tags(keys)
    out[:, :n] = head
    return {**st, REC_FIELD: torch.from_numpy(out)}


def new_item_tags(keys: np.ndarray) -> np.ndarray:
    """The int32 stand-in of a new item's 63-bit key in the stored list and in the targets:
    -2 - (key mod 2^30), never 0 (no item) or `NO_REC`; 0 for key 0. Two new items of one user
    share a tag with odds ~1e-9."""
    keys = np.asarray(keys, np.int64)
    return np.where(keys > 0, -2 - (keys & ((1 << 30) - 1)), 0).astype(np.int32)


def open_targets(items: np.ndarray, mem: np.ndarray, st: dict[str, torch.Tensor], new_keys, lengths: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`score_events`' targets and memory with the open catalogue: the batch's new-item events
    (item 0 with a key in `new_keys`, (B, T) padded) target their tag, and the pool's tags join
    the memory (a hit on a new item is a `repeat` hit). Unchanged without new items."""
    if new_keys is None or "new_key" not in st:
        return items, mem
    keys = new_keys[0].cpu().numpy()
    flat = keys[np.arange(keys.shape[1])[None, :] < lengths[:, None]]  # the events in `items`' order
    items = np.where(items == 0, new_item_tags(flat), items)
    return items, np.concatenate([mem, new_item_tags(st["new_key"].cpu().numpy())], axis=1)
