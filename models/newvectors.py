"""Vectors for items born after training: the open catalogue's explore extension.

A new item (an id absent from the item table, models/newitems.py) has no vector, so only the
repeat path of a user who touched it can rank it. Here it earns one from what the stream says
about it: the known items it co-occurs with in sessions.

- **Evidence** (`window_pairs`): an event pairs with the other kind of item (a new item with the
  known ones, a known item with the new ones) among the `window` events before it in the same
  session (the session rule of `models.base.opens_session`), each distinct partner once. A new
  item touched by several users collects the vectors of the known items around it.
- **The fold** (`Evidence`): per new-item key, the sum of its partners' item vectors and of their
  norms, in fixed point (int64, `SCALE`): integer sums do not depend on the order the pairs come
  in. Keys are kept in LRU order (a touch refreshes a key, a new key beyond `cap` evicts the least
  recent one), so memory stays bounded under a stream of one-off ids; eviction depends on the
  order, so whoever must agree applies the pairs in the same order.
- **The vector**: once a key has `min_evidence` pairs, the mean direction of its partners scaled
  to their mean norm (the item space the model scores with, `SeqModel.item_vecs`, so <u, v> is
  an explore score like any other).
- **The extension** (`Evidence.admitted`): the admitted keys sorted by key and their vectors: a
  second, exact inner-product index beside the catalogue's (small: at most `cap` rows), whose hits
  merge with the main hits by score. A key in the user's own pool keeps its pool score.

The evaluation's test phase (models/evaluation.py) reads the extension through `Timeline`: the
pairs of the whole log in time order, folded, and a snapshot at every `step_ms` boundary; a target
at time ts is ranked against the snapshot of the boundary at or before ts (evidence up to
`step_ms` late, where a live worker would see it within a batch).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from livemb.models import newitems, repeat
from livemb.models.base import session_flags

EVAL_STEP_MS = 600_000  # the evaluation's snapshot interval (10 min)
SCALE = float(1 << 24)  # fixed-point step of the evidence sums (vectors of norm ~1: 6e-8)


def sessions(ts: np.ndarray, gap_ms: int) -> np.ndarray:
    """Session number (0-based) of each event of one user's time-ordered log, by the rule of
    `models.base.session_flags`: the clock is the latest ts so far, a gap over gap_ms opens one."""
    ts = np.asarray(ts, np.int64)
    if not len(ts):
        return np.zeros(0, np.int64)
    prev = np.maximum.accumulate(np.concatenate([[-1], ts[:-1]]))
    opens = (prev < 0) | (ts - prev > gap_ms)
    return np.cumsum(opens) - 1


def window_pairs(items: np.ndarray, keys: np.ndarray, ts: np.ndarray, gap_ms: int, window: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One user's evidence: (event position, new-item key, known item index) for every pair of a
    new item (key > 0) and a known item (item > 0) at most `window` events apart in one session,
    emitted at the later event, each (event, key, item) once. Sorted by (position, key, item)."""
    items, keys = np.asarray(items, np.int64), np.asarray(keys, np.int64)
    sess = sessions(ts, gap_ms)
    pos, key, item = [], [], []
    for d in range(1, min(window, len(items) - 1) + 1):
        t = np.arange(d, len(items))
        same = sess[t] == sess[t - d]
        a = same & (keys[t] > 0) & (items[t - d] > 0)  # a new item after a known one
        b = same & (items[t] > 0) & (keys[t - d] > 0)  # a known item after a new one
        pos += [t[a], t[b]]
        key += [keys[t[a]], keys[t[b] - d]]
        item += [items[t[a] - d], items[t[b]]]
    if not pos:
        return (np.zeros(0, np.int64),) * 3
    trip = np.unique(np.stack([np.concatenate(pos), np.concatenate(key), np.concatenate(item)], 1), axis=0)
    return trip[:, 0], trip[:, 1], trip[:, 2]


class Evidence:
    """The fold: per new-item key, fixed-point sums of its partners' vectors and norms and their
    count, at most `cap` keys (LRU). Deterministic for a given order of `add` calls."""

    def __init__(self, dim: int, cap: int, min_evidence: int):
        self.dim, self.cap, self.min_evidence = dim, cap, min_evidence
        self.raw = np.zeros((cap, newitems.ID_BYTES), np.uint8)  # each key's id bytes (live: the message's id)
        self.rows: OrderedDict[int, int] = OrderedDict()  # key -> row, least recent first
        self.sums = np.zeros((cap, dim), np.int64)
        self.norms = np.zeros(cap, np.int64)
        self.count = np.zeros(cap, np.int64)
        self.keys = np.zeros(cap, np.int64)
        self.applied = 0  # pairs folded in
        self.evicted = 0  # keys dropped by the cap

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, keys: np.ndarray, vecs: np.ndarray, raw: np.ndarray | None = None) -> None:
        """Fold pairs in: keys (n,) int64 > 0, vecs (n, D) the partners' item vectors, raw (n,
        ID_BYTES) the keys' id bytes (None: not kept). Keys are touched in the order of their
        first pair here."""
        keys = np.asarray(keys, np.int64)
        if not len(keys):
            return
        fixed = np.rint(np.asarray(vecs, np.float64) * SCALE).astype(np.int64)
        norm = np.rint(np.linalg.norm(np.asarray(vecs, np.float64), axis=1) * SCALE).astype(np.int64)
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        row_of = np.empty(len(uniq), np.int64)
        for j in np.argsort(first, kind="stable"):
            row_of[j] = self._row(int(uniq[j]))
        rows = row_of[inv]
        if raw is not None:
            self.raw[row_of] = np.asarray(raw, np.uint8)[first]
        np.add.at(self.sums, rows, fixed)
        np.add.at(self.norms, rows, norm)
        np.add.at(self.count, rows, 1)
        self.applied += len(keys)

    def _row(self, key: int) -> int:
        row = self.rows.get(key)
        if row is not None:
            self.rows.move_to_end(key)
            return row
        if len(self.rows) < self.cap:
            row = len(self.rows)
        else:  # the least recently touched key leaves
            _, row = self.rows.popitem(last=False)
            self.evicted += 1
        self.rows[key] = row
        self.keys[row], self.sums[row], self.norms[row], self.count[row], self.raw[row] = key, 0, 0, 0, 0
        return row

    def admitted(self, with_raw: bool = False) -> tuple[np.ndarray, ...]:
        """(keys (E,) int64 sorted, vectors (E, D) float32[, raw ids (E, ID_BYTES)]) of the keys
        with min_evidence pairs."""
        n = len(self.rows)
        ok = np.flatnonzero(self.count[:n] >= self.min_evidence)
        ok = ok[np.argsort(self.keys[ok], kind="stable")]
        s = self.sums[ok].astype(np.float64)
        length = np.linalg.norm(s, axis=1, keepdims=True)
        scale = (self.norms[ok].astype(np.float64) / (self.count[ok] * SCALE))[:, None]  # the partners' mean norm
        vec = np.divide(s, length, out=np.zeros_like(s), where=length > 0) * scale
        if with_raw:
            return self.keys[ok].copy(), vec.astype(np.float32), self.raw[ok].copy()
        return self.keys[ok].copy(), vec.astype(np.float32)


class Timeline:
    """The extension over time for the evaluation: pairs (ts, key, vector) folded in time order
    (ties: by key, then as given), one snapshot `Evidence.admitted()` per `step_ms` boundary.
    `at(ts)` (B,) -> the snapshot index of each time; `snapshot(i)` -> (keys, vectors)."""

    def __init__(self, ts: np.ndarray, keys: np.ndarray, vecs: np.ndarray, boundaries: np.ndarray, *,
                 dim: int, cap: int, min_evidence: int):
        order = np.lexsort((keys, ts))
        ts, keys, vecs = ts[order], keys[order], vecs[order]
        self.boundaries = np.unique(np.asarray(boundaries, np.int64))
        self.snaps: list[tuple[np.ndarray, np.ndarray]] = []
        self.evidence = Evidence(dim, cap, min_evidence)
        cut = np.searchsorted(ts, self.boundaries, side="left")  # pairs strictly before each boundary
        done = 0
        for c in cut:
            self.evidence.add(keys[done:c], vecs[done:c])
            done = c
            self.snaps.append(self.evidence.admitted())

    def at(self, ts: np.ndarray) -> np.ndarray:
        """Index of the last boundary <= ts (-1: before the first, an empty extension)."""
        return np.searchsorted(self.boundaries, np.asarray(ts, np.int64), side="right") - 1

    def snapshot(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i < 0:
            return np.zeros(0, np.int64), np.zeros((0, self.evidence.dim), np.float32)
        return self.snaps[i]


def log_timeline(seqs: dict[str, tuple], keys: dict[str, np.ndarray], vectors: np.ndarray, query_ts: np.ndarray, *,
                 gap_ms: int, window: int, cap: int, min_evidence: int, step_ms: int) -> Timeline:
    """The `Timeline` of a log: `seqs` user -> (items, etypes, ts) time-ordered with `keys` user ->
    new-item keys aligned (models/newitems.key_sequences), `vectors` (N+1, D) the item space,
    snapshots at the `step_ms` boundaries of the `query_ts` (the targets' times)."""
    all_ts, all_keys, all_items = [], [], []
    for user in sorted(seqs):
        items, _, ts = seqs[user]
        k = keys.get(user)
        if k is None or not (k > 0).any():
            continue
        pos, key, item = window_pairs(items, k, ts, gap_ms, window)
        all_ts.append(np.asarray(ts, np.int64)[pos])
        all_keys.append(key)
        all_items.append(item)
    ts, key, item = (np.concatenate(xs) if xs else np.zeros(0, np.int64) for xs in (all_ts, all_keys, all_items))
    bounds = (np.asarray(query_ts, np.int64) // step_ms) * step_ms
    return Timeline(ts, key, np.asarray(vectors, np.float32)[item], bounds, dim=vectors.shape[1], cap=cap,
                    min_evidence=min_evidence)


def state_pairs(before: dict[str, Tensor], ev, keys: Tensor, gap_ms: int, dt_buckets: int, window: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The live evidence of a batch, from the users' state instead of their whole log:
    (row b, new-item key, known item index) of `window_pairs` for the events `ev` (B, T) with
    new-item keys `keys` (B, T), `before` the state before them (memory, pool, clocks). A known
    item within `window` events in the session is still in the memory (an LRU of M >= window
    slots) and a new item in the pool (NEW_SLOTS >= window), so both give the same pairs
    (tests/test_newvectors.py). Sorted by (event, key, item) within a row."""
    new_session, _ = session_flags(ev.ts, ev.mask, before["last_ts"], gap_ms, dt_buckets)
    session = before["session"][:, None] + new_session.long().cumsum(1)
    mem = {f: before[f] for f in repeat.MEMORY_FIELDS}
    pool = newitems.as_memory(before)
    pool = {f: pool[f] for f in repeat.MEMORY_FIELDS}
    out: list[np.ndarray] = []
    for t in torch.nonzero(ev.mask.any(0)).flatten().tolist():
        m, seq, sess = ev.mask[:, t], before["n_events"] + t, session[:, t]
        item, key = ev.item[:, t].long(), keys[:, t]

        a = _near(mem, sess, seq, window) & (m & (key > 0))[:, None]  # a new item after known ones
        b = _near(pool, sess, seq, window) & (m & (item > 0))[:, None]  # a known item after new ones
        ra, sa = torch.nonzero(a, as_tuple=True)
        rb, sb = torch.nonzero(b, as_tuple=True)
        out.append(torch.stack([torch.cat([ra, rb]), torch.full_like(torch.cat([ra, rb]), t),
                                torch.cat([key[ra], pool["mem_item"][rb, sb].long()]),
                                torch.cat([mem["mem_item"][ra, sa].long(), item[rb]])], 1).cpu().numpy())
        known = torch.where(m, item, torch.zeros_like(item))
        upd = repeat.update_memory(mem, known, ev.ts[:, t], ev.etype[:, t], sess, seq)
        mem = {f: torch.where(m[:, None], upd[f], mem[f]) for f in mem}
        nk = torch.where(m, key, torch.zeros_like(key))
        upd = repeat.update_memory(pool, nk, ev.ts[:, t], ev.etype[:, t], sess, seq)
        pool = {f: torch.where(m[:, None], upd[f], pool[f]) for f in pool}
    if not out:
        return (np.zeros(0, np.int64),) * 3
    q = np.concatenate(out)
    q = q[np.lexsort((q[:, 3], q[:, 2], q[:, 1], q[:, 0]))]
    return q[:, 0], q[:, 2], q[:, 3]


def _near(st: dict[str, Tensor], sess: Tensor, seq: Tensor, window: int) -> Tensor:
    """(B, S) slots touched at most `window` events before event clock `seq` in session `sess`."""
    return (st["mem_item"] > 0) & (st["mem_sess"] == sess[:, None]) & (seq[:, None] - st["mem_seq"] <= window)


class Extension:
    """The explore extension a batch searches: admitted keys (E,), their vectors (E, D) on the
    model's device and raw ids (E, ID_BYTES); rebuilt from the `Evidence` when it changed."""

    def __init__(self, evidence: Evidence, device: torch.device | str = "cpu"):
        keys, vecs, raw = evidence.admitted(with_raw=True)
        self.keys, self.raw = keys, raw
        self.vecs = torch.from_numpy(vecs).to(device)

    def __len__(self) -> int:
        return len(self.keys)
