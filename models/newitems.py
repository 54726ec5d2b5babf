"""Items born after training (the open catalogue): new item ids in each user's repeat memory.

An item id absent from the item table has no vector and no index (0, the unknown item, for the
model step). With the open catalogue on, it still enters a small per-user pool of `NEW_SLOTS`
slots beside the recent-items memory (models/repeat.py), keyed by a 63-bit hash of the id string
(blake2b: the same on every worker, after a restart and after a rebalance, with no registry),
with the raw id (up to `ID_BYTES` UTF-8 bytes, zero-padded) so a recommendation carries the
real id. The pool has the memory's per-slot behaviour fields and the memory's own LRU update
(`repeat.update_memory`: the least recent slot is evicted), so the repeat path scores a new item
from its count, recency, time gap, sessions and event types as it scores a known one
(`SeqModel.memory_scores(..., novec=)`); it has no explore score and never reaches faiss.
An id longer than `ID_BYTES` (or ending in a NUL byte) stays an unknown item only.

Fields, per user (`NEW_SLOTS` = 8 slots of 24 + 32 bytes, 448 bytes of arrays):

    new_key   int64  hash of the id (0 = empty)      new_count/seq/ts/sess/etype/seen: as mem_*
    new_id    uint8  (ID_BYTES,) the id's UTF-8 bytes

The live worker (stream/processor.py), `livemb embed` and the evaluation's test phase
(models/evaluation.py) all advance the pool with `update_pool` and score it through
`memory_scores`, so offline = live.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from livemb.models import repeat
from livemb.models.base import EventBatch, SeqModel, session_flags
from livemb.models.grouping import group_by_user

NEW_SLOTS = 8  # new items remembered per user (LRU)
ID_BYTES = 32  # longest new item id remembered (UTF-8 bytes)
_MASK63 = (1 << 63) - 1
# pool field -> the memory field it mirrors (same dtype and meaning)
_AS_MEM = {"new_key": "mem_item", "new_count": "mem_count", "new_seq": "mem_seq", "new_ts": "mem_ts",
           "new_sess": "mem_sess", "new_etype": "mem_etype", "new_seen": "mem_seen"}
ID_FIELD = "new_id"
POOL_FIELDS = (*_AS_MEM, ID_FIELD)
CLOCKS = ("n_events", "last_ts", "session")


def pool_spec(S: int = NEW_SLOTS) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    mem = repeat.memory_spec(S)
    return {**{new: mem[m] for new, m in _AS_MEM.items()}, ID_FIELD: ((S, ID_BYTES), torch.uint8)}


def init_pool(B: int, device: torch.device | str = "cpu", S: int = NEW_SLOTS) -> dict[str, Tensor]:
    mem = repeat.init_memory(B, S, torch.device(device))
    out = {new: mem[m] for new, m in _AS_MEM.items()}
    out[ID_FIELD] = torch.zeros((B, S, ID_BYTES), dtype=torch.uint8, device=device)
    return out


def has_pool(state: dict[str, Tensor]) -> bool:
    return "new_key" in state


def with_pool(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` plus an empty pool for its B users."""
    ref = state["mem_item"]
    return {**state, **init_pool(ref.shape[0], ref.device)}


def drop_pool(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k not in POOL_FIELDS}


def as_memory(state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The pool under the memory's field names plus the user's clocks (what `memory_features`,
    `heuristic_bonus` and `excluded_slots` read), or None when `state` has no pool."""
    if not has_pool(state):
        return None
    out = {m: state[new] for new, m in _AS_MEM.items()}
    out.update({k: state[k] for k in CLOCKS})
    return out


def keys_of(ids) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n,) int64, raw ids (n, ID_BYTES) uint8) of item ids (str or int, as the item table
    reads them); key 0 for an id that cannot be remembered (too long, empty, trailing NUL)."""
    n = len(ids)
    keys = np.zeros(n, np.int64)
    enc = []
    for i, x in enumerate(ids):  # one hash per new-item event, never per dimension
        b = str(x).encode("utf-8")
        if 0 < len(b) <= ID_BYTES and not b.endswith(b"\0"):
            keys[i] = (int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") & _MASK63) or 1
        else:
            b = b""
        enc.append(b)
    raw = np.array(enc, dtype=f"S{ID_BYTES}").view(np.uint8).reshape(n, ID_BYTES) if n else \
        np.zeros((0, ID_BYTES), np.uint8)
    return keys, raw


def event_keys(ids: np.ndarray, item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`keys_of` for the events whose item is not in the table (item_idx 0); 0 / zeros elsewhere."""
    keys = np.zeros(len(ids), np.int64)
    raw = np.zeros((len(ids), ID_BYTES), np.uint8)
    unknown = np.flatnonzero(item_idx == 0)
    if len(unknown):
        keys[unknown], raw[unknown] = keys_of(np.asarray(ids, dtype=object)[unknown])
    return keys, raw


def key_sequences(df, table) -> dict[str, np.ndarray]:
    """Per-user new-item keys of an event log, aligned with `models.train.sequences_from_frame`."""
    ids = df["item_id"].to_numpy()
    keys, _ = event_keys(ids, table.lookup(ids))
    users, groups = group_by_user(df["user_id"].to_numpy())
    return {str(users[k]): keys[groups[k]] for k in range(len(users))}


def pad(rows: list[np.ndarray], T: int, device: torch.device | str = "cpu") -> Tensor:
    """Ragged per-user arrays (n_b, ...) left-aligned into one (B, T, ...) tensor (zeros after)."""
    B = len(rows)
    tail = rows[0].shape[1:] if B else ()
    out = np.zeros((B, T, *tail), rows[0].dtype if B else np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return torch.from_numpy(out).to(device)


def update_pool(model: SeqModel, before: dict[str, Tensor], ev: EventBatch, keys: Tensor,
                raw: Tensor | None = None) -> dict[str, Tensor]:
    """The pool fields after the events `ev` (B, T) whose new-item keys are `keys` (B, T) (0: a
    known item, or not rememberable), `before`: the state before them (pool + clocks). Event t
    touches the pool with the memory's own update, with the session and event clock the model
    step gives it (so an item and its new-item twin age alike). `raw` (B, T, ID_BYTES): the ids'
    bytes, written where a key enters a slot (None: ids not kept, the evaluation ranks by key)."""
    new_session, _ = session_flags(ev.ts, ev.mask, before["last_ts"], model.cfg.session_gap_ms, model.cfg.dt_buckets)
    session = before["session"][:, None] + new_session.long().cumsum(1)
    mem = {m: before[new] for new, m in _AS_MEM.items()}
    ids = before[ID_FIELD]
    live = ev.mask & (keys > 0)
    for t in torch.nonzero(live.any(0)).flatten().tolist():
        m = live[:, t]
        upd = repeat.update_memory(mem, keys[:, t], ev.ts[:, t], ev.etype[:, t], session[:, t], before["n_events"] + t)
        if raw is not None:
            entered = (upd["mem_item"] != mem["mem_item"]) & m[:, None]  # (B, S): a key took this slot
            ids = torch.where(entered[..., None], raw[:, t, None, :], ids)
        mem = {k: torch.where(m[:, None], upd[k], mem[k]) for k in mem}
    out = {new: mem[m] for new, m in _AS_MEM.items()}
    out[ID_FIELD] = ids
    return out


def slot_refs(state: dict[str, Tensor]) -> Tensor:
    """(B, S) int64 candidate references of the pool slots: -(s + 1) for a filled slot s, 0 for an
    empty one (a candidate's item index is 1..N for a catalogue item, negative for a new item)."""
    S = state["new_key"].shape[1]
    ref = -torch.arange(1, S + 1, device=state["new_key"].device).expand_as(state["new_key"])
    return torch.where(state["new_key"] > 0, ref, torch.zeros_like(ref))


def ref_rows(items: np.ndarray, state: dict[str, Tensor], ext_keys: np.ndarray | None = None,
             ext_raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The new items among candidate references (B, K): (b, k, key, raw id bytes) of every negative
    one: -(s + 1) for pool slot s (`slot_refs`), -(S + 1 + e) for row e of the new-item extension
    (models/newvectors.py: `ext_keys` (E,), `ext_raw` (E, ID_BYTES))."""
    b, k = np.nonzero(items < 0)
    j = -items[b, k] - 1
    S = state["new_key"].shape[1] if len(b) else 0
    keys = np.zeros(len(b), np.int64)
    raw = np.zeros((len(b), ID_BYTES), np.uint8)
    slot = j < S
    if slot.any():
        bt, st_ = torch.from_numpy(b[slot]), torch.from_numpy(j[slot])
        keys[slot] = state["new_key"][bt, st_].cpu().numpy()
        raw[slot] = state[ID_FIELD][bt, st_].cpu().numpy()
    if (~slot).any():
        e = j[~slot] - S
        keys[~slot], raw[~slot] = ext_keys[e], ext_raw[e]
    return b, k, keys, raw


def candidate_ids(items: np.ndarray, table, state: dict[str, Tensor], extension=None) -> np.ndarray:
    """(B, K) ids of candidate references: table ids for 1..N, '' for 0, the new item's raw id for
    a negative reference (`ref_rows`; `extension`: the models/newvectors.Extension searched)."""
    ids = table.id_of(np.maximum(items, 0))
    if not (items < 0).any():
        return ids
    b, k, _, raw = ref_rows(items, state, *((extension.keys, extension.raw) if extension is not None else (None, None)))
    ids = ids.astype(object)
    ids[b, k] = [bytes(r).rstrip(b"\0").decode("utf-8") for r in raw]
    return ids


def absorb(arrays: dict[str, np.ndarray], table) -> None:
    """Stored rows (B, ...) read under a new item table: pool slots whose id the table now knows
    leave the pool, in place, into the memory (merged with the item's memory slot if it has one,
    else into the least recent slot when that one is older; else dropped, as the memory's LRU
    would have). A Python step per absorbed item, at an item-table swap only."""
    if "new_key" not in arrays or "mem_item" not in arrays:
        return
    rows, slots = np.nonzero(arrays["new_key"] > 0)
    if not len(rows):
        return
    raw = arrays[ID_FIELD][rows, slots]
    idx = table.lookup(np.array([bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in raw], dtype=object))
    keep = idx > 0
    rows, slots, idx = rows[keep], slots[keep], idx[keep]
    for j in np.argsort(arrays["new_seq"][rows, slots], kind="stable"):  # least recent first
        b, s, item = rows[j], slots[j], idx[j]
        pool = {m: arrays[new][b, s] for new, m in _AS_MEM.items()}
        same = np.flatnonzero(arrays["mem_item"][b] == item)
        m = int(same[0]) if len(same) else int(np.argmin(arrays["mem_seq"][b]))
        if len(same):
            newer = pool["mem_seq"] > arrays["mem_seq"][b, m]
            count = min(int(arrays["mem_count"][b, m]) + int(pool["mem_count"]), repeat.COUNT_MAX)
            seen = arrays["mem_seen"][b, m] | pool["mem_seen"]
            if newer:
                for f in ("mem_seq", "mem_ts", "mem_sess", "mem_etype"):
                    arrays[f][b, m] = pool[f]
            arrays["mem_count"][b, m], arrays["mem_seen"][b, m] = count, seen
        elif arrays["mem_seq"][b, m] < pool["mem_seq"]:
            for f, v in pool.items():
                arrays[f][b, m] = item if f == "mem_item" else v
        for new in _AS_MEM:  # the slot is empty again
            arrays[new][b, s] = -1 if new in ("new_seq", "new_sess") else 0
        arrays[ID_FIELD][b, s] = 0
