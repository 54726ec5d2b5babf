"""Non-neural baselines: popularity (pop), sequential rules (sr), session kNN (sknn), MaxItem.

They learn nothing beyond counting in `fit(train_sequences)` and read everything else from the
shared recent-items memory of the streaming state (models/repeat.py): the last item is the filled
slot with the largest `mem_seq`, the current session's items are the slots with
`mem_sess == session`, the user's recent history is every filled slot. They produce no user vector
(`cell` returns zeros), only `scores`.

Each `scores` returns its explore scores rescaled per row into [-1, 1] (a positive scale per row,
so rankings are unchanged) and, unless the repeat mode is "none", adds the fixed "recent items
first" heuristic (repeat.heuristic_bonus, >= ~1e3) on top: that is the "+rep" variant.

`train_sequences` is a list of per-user tuples (items int64 1-based with 0 = unknown, etypes,
ts int64 ms), each sorted by time. Sessions split exactly as models.base.session_flags does
(gap to the running max of earlier timestamps > cfg.session_gap_ms); unknown items keep the
session clock going but are dropped from the item sequences.

Counts live in non-persistent buffers (they move with `.to(device)` and are not checkpointed;
re-run `fit`, it is cheap). Sparse tables are CSR triplets (crow, col, val) gathered with a
vectorised row lookup, which works the same on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from livemb.models import repeat
from livemb.models.base import ModelConfig, SeqModel, SeqOut, register

TrainSequences = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------- helpers
def split_sessions(
    train_sequences: TrainSequences, gap_ms: int, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten per-user sequences into known-item events with global session ids.

    Returns (items (E,), session id (E,), session start ts (S,)): items are the known (> 0) items
    in order, session ids 0..S-1 are contiguous per user; sessions are numbered in input order
    (user by user), not by time. Sessions made only of unknown items are dropped.
    """
    lengths = np.fromiter((len(s[0]) for s in train_sequences), np.int64, len(train_sequences))
    if lengths.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    items = np.concatenate([np.asarray(s[0], np.int64) for s in train_sequences])
    ts = np.concatenate([np.asarray(s[2], np.int64) for s in train_sequences])
    if items.max(initial=0) > n_items or items.min(initial=0) < 0:
        raise ValueError(f"training items must be in 0..{n_items}")
    user = np.repeat(np.arange(len(lengths)), lengths)
    first = np.ones(len(items), bool)
    first[1:] = user[1:] != user[:-1]
    # running max of ts within each user (late events never move the session clock back)
    span = int(ts.max() - ts.min()) + 1
    if span * (len(lengths) + 1) < 2**62:
        runmax = np.maximum.accumulate((ts - ts.min()) + user * span) - user * span + ts.min()
    else:  # offsets would overflow: per-user fallback
        runmax = np.concatenate(
            [np.maximum.accumulate(np.asarray(s[2], np.int64)) for s in train_sequences if len(s[0])]
        )
    prev = np.empty_like(runmax)
    prev[1:] = runmax[:-1]
    new_sess = first.copy()
    new_sess[1:] |= (ts[1:] - prev[1:]) > gap_ms
    sess = np.cumsum(new_sess) - 1
    start_ts = ts[new_sess]
    known = items > 0
    items, sess = items[known], sess[known]
    # renumber to drop sessions without known items
    used, sess = np.unique(sess, return_inverse=True)
    return items, sess.astype(np.int64), start_ts[used]


def _csr(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triplets already sorted by row -> (crow (n_rows+1,), col, val)."""
    crow = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=crow[1:])
    return crow, cols.astype(np.int64), vals


def gather_rows(crow: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Vectorised CSR row lookup: for rows (R,) return (which (L,), idx (L,)), one entry per stored
    element of those rows, `which` the position in `rows`, `idx` the index into col/val."""
    starts = crow[rows]
    lens = crow[rows + 1] - starts
    which = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lens)
    first = torch.cumsum(lens, 0) - lens
    offs = torch.arange(which.numel(), device=rows.device) - first[which]
    return which, starts[which] + offs


def _rescale(s: Tensor) -> Tensor:
    """Divide each row by its max |score| (>0 scale: rankings unchanged) so scores lie in [-1, 1]
    and the +rep bonus (~1e3) always puts recent items first. In place: `s` must be a fresh tensor
    (every `explore` returns one); max |s| = max(max s, -min s) saves an |s| copy."""
    scale = torch.maximum(s.amax(dim=1, keepdim=True), s.amin(dim=1, keepdim=True).neg())
    return s.div_(scale.clamp(min=1e-30))


class _CountingBaseline(SeqModel):
    """Shared plumbing: no user vector, a popularity table, the +rep heuristic."""

    trainable = False
    embeds = False
    tie_break = 1e-6  # weight of the normalised popularity that breaks ties

    def __init__(self, cfg: ModelConfig, item_vectors):
        super().__init__(cfg, item_vectors)
        self.register_buffer("pop", torch.zeros(self.n_items + 1, device=self.device), persistent=False)

    def cell(self, st, inp, item, etype, new_session, level):
        return {}, torch.zeros(item.shape[0], self.cfg.dim, device=inp.device)

    def forward_seq(self, inp, item, new_session, level, mask):
        return SeqOut(torch.zeros(*item.shape, self.cfg.dim, device=inp.device))

    def _fit_pop(self, items: np.ndarray) -> None:
        counts = np.bincount(items, minlength=self.n_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.pop = torch.from_numpy(counts).to(self.device)

    def fit(self, train_sequences: TrainSequences):
        items, _, _ = split_sessions(train_sequences, self.cfg.session_gap_ms, self.n_items)
        self._fit_pop(items)
        return self

    def pop_norm(self) -> Tensor:
        return self.pop / self.pop.max().clamp(min=1.0)

    def explore(self, state: dict[str, Tensor]) -> Tensor:
        """(B, N+1) raw scores, column 0 ignored."""
        raise NotImplementedError

    def scores(self, state: dict[str, Tensor], u: Tensor | None = None, repeat_mode: str | None = None,
               explore: Tensor | None = None, running: Tensor | None = None) -> Tensor:
        if explore is None:
            s = _rescale(self.explore(state).float())
            s[:, 0] = -math.inf
        else:  # the repeat_mode="none" scores, already computed
            s = explore
        if (self.repeat_mode if repeat_mode is None else repeat_mode) != "none":
            s = repeat.add_to_scores(s, state["mem_item"], self.rule_bonus(state))
        return s

    @staticmethod
    def last_item(state: dict[str, Tensor]) -> Tensor:
        """(B,) last known item from the memory (0 when the memory is empty)."""
        slot = state["mem_seq"].argmax(dim=1, keepdim=True)
        return state["mem_item"].gather(1, slot).squeeze(1).long()


# ---------------------------------------------------------------------- models
@register
class Popularity(_CountingBaseline):
    """score(i) = number of training interactions with i."""

    name = "pop"

    def explore(self, state):
        B = state["mem_item"].shape[0]
        return self.pop_norm().expand(B, -1).clone()


@register
class SequentialRules(_CountingBaseline):
    """SR (Ludewig & Jannach 2018): rules[a, b] += 1/d when b follows a by d <= `steps` positions in
    the same training session; score(i) = rules[last item, i] (+ a tiny popularity tie-break)."""

    name = "sr"
    steps = 3

    def __init__(self, cfg: ModelConfig, item_vectors, steps: int = 3):
        super().__init__(cfg, item_vectors)
        self.steps = steps
        dev = self.device
        self.register_buffer(
            "rule_crow", torch.zeros(self.n_items + 2, dtype=torch.int64, device=dev), persistent=False
        )
        self.register_buffer("rule_col", torch.zeros(0, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("rule_val", torch.zeros(0, dtype=torch.float32, device=dev), persistent=False)

    def fit(self, train_sequences: TrainSequences):
        items, sess, _ = split_sessions(train_sequences, self.cfg.session_gap_ms, self.n_items)
        self._fit_pop(items)
        n = self.n_items + 1
        keys, weights = [], []
        for d in range(1, self.steps + 1):
            same = sess[d:] == sess[:-d]
            keys.append(items[:-d][same] * n + items[d:][same])
            weights.append(np.full(int(same.sum()), 1.0 / d))
        key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        w = np.concatenate(weights) if weights else np.zeros(0)
        uniq, inv = np.unique(key, return_inverse=True)
        val = np.bincount(inv.reshape(-1), weights=w, minlength=len(uniq)).astype(np.float32)
        crow, col, val = _csr(uniq // n, uniq % n, val, n)
        dev = self.device
        self.rule_crow = torch.from_numpy(crow).to(dev)
        self.rule_col = torch.from_numpy(col).to(dev)
        self.rule_val = torch.from_numpy(val).to(dev)
        return self

    def explore(self, state):
        last = self.last_item(state)
        B = last.shape[0]
        rules = torch.zeros(B, self.n_items + 1, device=self.device)
        which, idx = gather_rows(self.rule_crow, last)
        rules[which, self.rule_col[idx]] = self.rule_val[idx]
        rules = rules / rules.amax(dim=1, keepdim=True).clamp(min=1e-30)
        return rules + self.tie_break * self.pop_norm()


@register
class SessionKNN(_CountingBaseline):
    """SKNN (Jannach & Ludewig 2017): cosine similarity of binary item sets between the current
    session and the training sessions; the `k` most similar are the neighbours and
    score(i) = sum of the similarities of the neighbours containing i (+ popularity tie-break).

    Candidates come from an inverted index truncated to each item's `sample_size` most recent
    training sessions (by start time), which bounds the work per query item. The overlap with a
    candidate is counted from those truncated lists, so it can be undercounted for a session that
    fell out of a very popular item's list. Users are scored in chunks of at most `chunk` rows and
    `max_cells` (users x sessions) cells.
    """

    name = "sknn"
    max_cells = 1 << 24  # users per chunk * training sessions: bounds the dense overlap matrix

    def __init__(self, cfg: ModelConfig, item_vectors, k: int = 100, sample_size: int = 1000, chunk: int = 256):
        super().__init__(cfg, item_vectors)
        self.k, self.sample_size, self.chunk = k, sample_size, chunk
        dev = self.device
        z64 = torch.zeros(0, dtype=torch.int64, device=dev)
        self.register_buffer("sess_crow", torch.zeros(1, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("sess_items", z64.clone(), persistent=False)
        self.register_buffer("sess_len", torch.zeros(0, device=dev), persistent=False)
        self.register_buffer(
            "item_crow", torch.zeros(self.n_items + 2, dtype=torch.int64, device=dev), persistent=False
        )
        self.register_buffer("item_sess", z64.clone(), persistent=False)

    def fit(self, train_sequences: TrainSequences):
        items, sess, start_ts = split_sessions(train_sequences, self.cfg.session_gap_ms, self.n_items)
        self._fit_pop(items)
        n = self.n_items + 1
        S = len(start_ts)
        # number sessions by start time so "more recent" = larger id
        order = np.argsort(start_ts, kind="stable")
        new_id = np.empty(S, np.int64)
        new_id[order] = np.arange(S)
        sess = new_id[sess]
        pairs = np.unique(sess * n + items)  # binary sets, sorted by (session, item)
        p_sess, p_item = pairs // n, pairs % n
        s_crow, s_items, _ = _csr(p_sess, p_item, None, S)
        # inverted index: item -> its most recent `sample_size` sessions
        by_item = np.lexsort((p_sess, p_item))
        i_item, i_sess = p_item[by_item], p_sess[by_item]
        i_crow = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(i_item, minlength=n), out=i_crow[1:])
        pos_from_end = i_crow[i_item + 1] - np.arange(len(i_item))  # 1 = most recent
        keep = pos_from_end <= self.sample_size
        i_item, i_sess = i_item[keep], i_sess[keep]
        i_crow = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(i_item, minlength=n), out=i_crow[1:])
        dev = self.device
        self.sess_crow = torch.from_numpy(s_crow).to(dev)
        self.sess_items = torch.from_numpy(s_items).to(dev)
        self.sess_len = torch.from_numpy(np.diff(s_crow).astype(np.float32)).to(dev)
        self.item_crow = torch.from_numpy(i_crow).to(dev)
        self.item_sess = torch.from_numpy(i_sess.astype(np.int64)).to(dev)
        return self

    def explore(self, state):
        B = state["mem_item"].shape[0]
        out = self.tie_break * self.pop_norm().expand(B, -1).clone()
        rows = max(1, min(self.chunk, self.max_cells // max(1, self.sess_len.shape[0])))
        for b0 in range(0, B, rows):
            sl = slice(b0, min(B, b0 + rows))
            out[sl] += self._neighbour_scores(state["mem_item"][sl].long(), state["mem_sess"][sl].long(), state["session"][sl])
        return out

    def _neighbour_scores(self, mem_item: Tensor, mem_sess: Tensor, session: Tensor) -> Tensor:
        B = mem_item.shape[0]
        dev = self.device
        res = torch.zeros(B, self.n_items + 1, device=dev)
        S = self.sess_len.shape[0]
        cur = (mem_item > 0) & (mem_sess == session[:, None])  # (B, M) current session's items
        q_len = cur.sum(1).float()
        qb, qm = cur.nonzero(as_tuple=True)
        if qb.numel() == 0 or S == 0:
            return res
        which, idx = gather_rows(self.item_crow, mem_item[qb, qm])
        if which.numel() == 0:
            return res
        # dense (B, S) overlap counts (the caller bounds B * S), then the k best sessions per user
        overlap = torch.zeros(B, S, device=dev)
        overlap.index_put_((qb[which], self.item_sess[idx]), torch.ones(which.numel(), device=dev), accumulate=True)
        # cosine = overlap / sqrt(|q| |s|); the per-user 1/sqrt(|q|) does not change the top k
        sim, cs = overlap.mul_(self.sess_len.rsqrt()[None, :]).topk(min(self.k, S), dim=1, sorted=False)
        sim = sim * q_len.clamp(min=1.0).rsqrt()[:, None]
        cb = torch.arange(B, device=dev)[:, None].expand_as(cs)
        keep = sim > 0
        cb, cs, sim = cb[keep], cs[keep], sim[keep]
        which, idx = gather_rows(self.sess_crow, cs)
        res.index_put_((cb[which], self.sess_items[idx]), sim[which], accumulate=True)
        return res


@register
class MaxItem(_CountingBaseline):
    """MaxItem (HierTCN paper): score(i) = max over the user's past items p of <x_p, x_i>.

    From the state alone the max runs over the memory (users with an empty memory score every
    item 0). The evaluation keeps a running max instead (`init_running`): initialised from the
    memory after the warm-up, then one (B, N+1) product per applied event, never M of them per
    scored event."""

    name = "maxitem"

    def _memory_max(self, state):
        mem = state["mem_item"].long()
        # empty slots repeat the last item (which does not change the max); an empty memory is
        # all item 0, whose zero vector gives the all-zero row
        mem = torch.where(mem > 0, mem, self.last_item(state)[:, None])
        X = self.item_vecs
        best = X[mem[:, 0]] @ X.T
        tmp = torch.empty_like(best)  # one (B, N+1) product per slot into one buffer, never (B, M, N+1)
        for m in range(1, mem.shape[1]):
            torch.matmul(X[mem[:, m]], X.T, out=tmp)
            torch.maximum(best, tmp, out=best)
        return best

    def explore(self, state):
        return self._memory_max(state)

    def init_running(self, state: dict[str, Tensor]) -> Tensor:
        """(B, N+1) running max, -inf for users with nothing in memory yet."""
        best = self._memory_max(state)
        return best.masked_fill(~(state["mem_item"] > 0).any(1)[:, None], -math.inf)

    def update_running(self, run: Tensor, item: Tensor) -> None:
        """Fold the applied event's item (B,) into the running max in place (unknown items: no-op)."""
        x = (self.item_vecs[item] @ self.item_vecs.T).masked_fill_((item <= 0)[:, None], -math.inf)
        torch.maximum(run, x, out=run)  # in place: no (B, N+1) temporaries beyond the product

    def scores(self, state, u=None, repeat_mode=None, explore=None, running: Tensor | None = None):
        if running is None or explore is not None:
            return super().scores(state, u, repeat_mode, explore)
        s = _rescale(running.masked_fill(torch.isneginf(running), 0.0))
        s[:, 0] = -math.inf
        if (self.repeat_mode if repeat_mode is None else repeat_mode) != "none":
            s = repeat.add_to_scores(s, state["mem_item"], self.rule_bonus(state))
        return s


__all__ = ["MaxItem", "Popularity", "SequentialRules", "SessionKNN", "gather_rows", "split_sessions"]
