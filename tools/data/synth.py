"""Synthetic click log with planted structure (`livemb synth`).

What is planted, so that models can be checked against a known truth:
- items belong to topics and sit in a fixed order around their topic's "ring"; an item's vector is
  its topic centroid plus a point on a 2-d circle (the ring position) plus noise, L2-normalised;
- each user has a long-term taste: 2-3 topics with Dirichlet weights;
- each session has one intent topic drawn from the taste, a different one from the previous
  session's when the taste allows (variety seeking: the next session is predictable from the long
  term, not from the last session);
- inside a session the intent is a walk: it enters the topic at a popular item (Zipf) and each
  click moves 2-6 places forward around the ring (short-term order a sequence model can learn);
  ~15 % of clicks leave the intent (another taste topic or any topic, by popularity);
- ~20 % of events re-click an item the user clicked before (recent ones more likely);
- sessions are > 1 h apart, clicks inside a session 10-120 s apart.
Everything is generated with array operations over all users at once and is deterministic by seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from livemb.core.errors import ConfigError
from livemb.core.extras import require

T0_MS = 1_700_000_000_000  # 2023-11-14, an arbitrary but realistic epoch origin
SESSION_GAP_MIN_MS = 3_600_001  # strictly more than 1 h between sessions
CLICK_GAP_MS = (10_000, 120_000)
SESSION_LEN = (2, 15)
SESSIONS_PER_USER = (3, 10)
P_INTENT = 0.85  # click that follows the session's intent (a step of its walk)
P_OTHER_TASTE = 0.10  # else from another of the user's topics (the rest: any topic)
P_RECLICK = 0.20
RECLICK_RECENCY = 0.15  # geometric p of "how many events back": mean ~7 events
ZIPF_A = 1.0
WALK_STEPS = (2, 3, 4, 5, 6)  # an in-intent click moves this many places forward on the ring (uniform)
RING_AMP = 0.8  # radius of the ring component vs the unit centroid
NOISE = 0.15  # norm of the per-item noise
FRESH_REDRAWS = 4
EVENT_TYPES = np.array(["click", "cart", "purchase"])
EVENT_TYPE_P = (0.87, 0.10, 0.03)


def _item_space(rng: np.random.Generator, items: int, topics: int, dim: int):
    """-> (item vectors, by_topic, popularity CDF, first index of each topic in by_topic, topic sizes).

    `by_topic` lists item ids topic by topic in ring order; the CDF values of topic t lie in
    (t, t+1], so one searchsorted samples any topic's popularity at once.
    """
    # Centroid and ring plane of each topic: orthonormal when dim allows, so rings do not overlap.
    basis = rng.normal(size=(dim, max(dim, 3 * topics)))
    q = np.linalg.qr(basis.T)[0].T if 3 * topics <= dim else basis.T / np.sqrt(dim)
    centroids, ring1, ring2 = q[:topics], q[topics : 2 * topics], q[2 * topics : 3 * topics]
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    item_topic = rng.permutation(np.arange(items) % topics)  # balanced topic sizes
    by_topic = np.lexsort((rng.random(items), item_topic))  # item ids in ring order, topic by topic
    topic_sorted = item_topic[by_topic]
    starts = np.searchsorted(topic_sorted, np.arange(topics))
    sizes = np.bincount(item_topic, minlength=topics)
    ring_pos = np.arange(items) - starts[topic_sorted]  # position of by_topic[k] on its ring
    angle = 2 * np.pi * ring_pos / sizes[topic_sorted]
    on_ring = centroids[topic_sorted] + RING_AMP * (
        np.cos(angle)[:, None] * ring1[topic_sorted] + np.sin(angle)[:, None] * ring2[topic_sorted]
    )
    noise = rng.normal(size=(items, dim)) * (NOISE / np.sqrt(dim))
    vectors = np.empty((items, dim))
    vectors[by_topic] = on_ring
    vectors += noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    # Popularity: a random Zipf rank inside each topic, independent of the ring position.
    rank = np.argsort(np.lexsort((rng.random(items), topic_sorted))) - starts[topic_sorted]
    w = 1.0 / (rank + 1.0) ** ZIPF_A
    csum = np.cumsum(w)
    base = np.concatenate([[0.0], csum])[starts][topic_sorted]
    totals = np.add.reduceat(w, starts)
    cdf = topic_sorted + (csum - base) / totals[topic_sorted]
    last = np.r_[starts[1:] - 1, items - 1]
    cdf[last] = topic_sorted[last] + 1.0  # exact upper ends, no float gaps between topics
    return vectors.astype(np.float32), by_topic, cdf, starts, sizes


def _group_cumsum_exclusive(values: np.ndarray, group_start: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """Sum of the earlier values within each contiguous group (0 for a group's first element)."""
    c = np.cumsum(values) - values
    return c - c[group_start][group_of]


def synth_log(
    users: int = 200, items: int = 500, days: int = 14, seed: int = 0, topics: int = 10, dim: int = 32
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """-> (events sorted by ts, item ids (str, N), item vectors (float32, N x dim))."""
    if users < 1 or items < 1 or topics < 1 or dim < 1 or days <= 0:
        raise ConfigError("synth_log: users, items, topics, dim must be >= 1 and days > 0")
    if items < topics:
        raise ConfigError(f"synth_log: need at least as many items ({items}) as topics ({topics})")
    rng = np.random.default_rng(seed)
    vectors, by_topic, cdf, topic_start, topic_size = _item_space(rng, items, topics, dim)

    # Long-term taste: 2-3 topics per user with Dirichlet weights (a dense users x topics matrix).
    n_taste = rng.integers(2, 4, size=users)
    n_taste = np.minimum(n_taste, topics)
    taste_rank = np.argsort(rng.random((users, topics)), axis=1).argsort(axis=1)
    in_taste = taste_rank < n_taste[:, None]
    taste = np.where(in_taste, rng.gamma(1.0, size=(users, topics)), 0.0)
    taste /= taste.sum(axis=1, keepdims=True)

    def draw_topic(weights: np.ndarray) -> np.ndarray:
        cdf_w = np.cumsum(weights, axis=1)
        u = rng.random(len(weights))[:, None] * cdf_w[:, -1:]
        return np.minimum((u > cdf_w).sum(axis=1), topics - 1)

    # Sessions: per user a count, per session a length and an intent topic drawn from the taste,
    # never the previous session's topic when the taste has another (one vectorised round per
    # session index).
    n_sess = rng.integers(SESSIONS_PER_USER[0], SESSIONS_PER_USER[1] + 1, size=users)
    sess_user = np.repeat(np.arange(users), n_sess)
    sess_len = rng.integers(SESSION_LEN[0], SESSION_LEN[1] + 1, size=len(sess_user))
    user_first_sess = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
    sess_intent = np.zeros(len(sess_user), dtype=np.int64)
    prev = np.full(users, -1)
    for k in range(int(n_sess.max())):
        who = np.flatnonzero(n_sess > k)
        w = taste[who].copy()
        had = prev[who] >= 0
        w[np.flatnonzero(had), prev[who][had]] = 0.0
        alone = w.sum(axis=1) == 0  # single-topic taste: nothing else to switch to
        w[alone] = taste[who][alone]
        prev[who] = sess_intent[user_first_sess[who] + k] = draw_topic(w)

    # Events: an in-intent click walks forward around the intent's ring from a popular entry item;
    # the others come from another taste topic or any topic, by popularity.
    ev_sess = np.repeat(np.arange(len(sess_user)), sess_len)
    ev_user = sess_user[ev_sess]
    n_ev = len(ev_sess)
    sess_first_ev = np.concatenate([[0], np.cumsum(sess_len)[:-1]])
    r = rng.random(n_ev)
    walk = r < P_INTENT
    intent = sess_intent[ev_sess]
    entry = np.searchsorted(cdf, sess_intent + rng.random(len(sess_user)), side="right") - topic_start[sess_intent]
    step = np.where(walk, rng.choice(WALK_STEPS, size=n_ev), 0)
    step[sess_first_ev] = 0
    offset = _group_cumsum_exclusive(step, sess_first_ev, ev_sess) + step
    walk_item = by_topic[topic_start[intent] + (entry[ev_sess] + offset) % topic_size[intent]]
    other_topic = np.where(r < P_INTENT + P_OTHER_TASTE, draw_topic(taste[ev_user]), rng.integers(topics, size=n_ev))
    fresh = np.where(walk, walk_item, by_topic[np.searchsorted(cdf, other_topic + rng.random(n_ev), side="right")])
    reclick = rng.random(n_ev) < P_RECLICK

    # An off-intent click should be new to the user, otherwise Zipf inside small topics alone makes
    # many events repeats. Redraw the clashes a few rounds (vectorised).
    fresh_pos = np.flatnonzero(~reclick)
    for _ in range(FRESH_REDRAWS):
        dup = pd.DataFrame({"u": ev_user[fresh_pos], "i": fresh[fresh_pos]}).duplicated().to_numpy()
        at = fresh_pos[dup & ~walk[fresh_pos]]
        if not len(at):
            break
        fresh[at] = by_topic[np.searchsorted(cdf, other_topic[at] + rng.random(len(at)), side="right")]

    # Timestamps: clicks 10-120 s apart inside a session; sessions separated by > 1 h plus a random
    # share of the user's spare time, so each user's sessions spread over `days`.
    click_gap = rng.integers(CLICK_GAP_MS[0], CLICK_GAP_MS[1] + 1, size=n_ev)
    click_gap[sess_first_ev] = 0
    offset_in_sess = _group_cumsum_exclusive(click_gap, sess_first_ev, ev_sess) + click_gap
    sess_dur = np.add.reduceat(click_gap, sess_first_ev)
    busy = np.add.reduceat(sess_dur + SESSION_GAP_MIN_MS, user_first_sess)
    spare = np.maximum(days * 86_400_000 - busy, 0)
    share = rng.gamma(1.0, size=len(sess_user))
    share /= np.add.reduceat(share, user_first_sess)[sess_user]
    pre_gap = (share * spare[sess_user]).astype(np.int64)
    later = np.ones(len(sess_user), dtype=bool)
    later[user_first_sess] = False
    pre_gap[later] += SESSION_GAP_MIN_MS
    sess_start = _group_cumsum_exclusive(pre_gap + sess_dur, user_first_sess, sess_user) + pre_gap
    ts = T0_MS + sess_start[ev_sess] + offset_in_sess

    # Re-clicks: an event copies the item of an event `back` steps earlier of the same user
    # (geometric: recent more likely). Chains (copy of a copy) are resolved by pointer jumping.
    user_first_ev = np.concatenate([[0], np.cumsum(np.add.reduceat(sess_len, user_first_sess))[:-1]])
    pos = np.arange(n_ev)
    back = rng.geometric(RECLICK_RECENCY, size=n_ev)
    src = np.maximum(pos - back, user_first_ev[ev_user])
    reclick[user_first_ev] = False
    src = np.where(reclick, src, pos)
    while True:
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    item = fresh[src]

    ev_type = EVENT_TYPES[rng.choice(len(EVENT_TYPES), size=n_ev, p=EVENT_TYPE_P)]
    ids = np.array([f"i{k}" for k in range(items)])
    user_ids = np.array([f"u{k}" for k in range(users)])
    n_in_user = pos - user_first_ev[ev_user]
    df = pd.DataFrame(
        {
            "user_id": user_ids[ev_user],
            "item_id": ids[item],
            "ts": ts.astype(np.int64),
            "event_type": ev_type,
            "event_id": pd.Series(user_ids[ev_user]) + "-" + pd.Series(n_in_user).astype(str),
        }
    )
    df = df.sort_values("ts", kind="stable", ignore_index=True)
    return df, ids, vectors


def write_log(df: pd.DataFrame, path: str | Path) -> Path:
    """Write an event log as CSV/TSV/Parquet/JSONL by suffix (.gz allowed for text formats)."""
    path = Path(path)
    out = df.copy()
    if "event_type" not in out:
        out["event_type"] = "click"
    if "event_id" not in out or (out["event_id"].astype(str) == "").all():
        # f"{user}-{n}" with n the event's number within its user (in time order).
        n = out.groupby("user_id", sort=False).cumcount()
        out["event_id"] = out["user_id"].astype(str) + "-" + n.astype(str)
    out = out[["user_id", "item_id", "ts", "event_type", "event_id"]]
    suffixes = [s.lower() for s in path.suffixes]
    ext = suffixes[-2] if len(suffixes) >= 2 and suffixes[-1] == ".gz" else (suffixes[-1] if suffixes else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext in (".csv", ".tsv", ".txt"):
        out.to_csv(path, sep="," if ext == ".csv" else "\t", index=False)
    elif ext == ".parquet" and suffixes[-1] == ".parquet":
        require("pyarrow", f"{path}: writing Parquet")
        out.to_parquet(path, index=False)
    elif ext in (".jsonl", ".json"):
        out.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        raise ConfigError(f"{path}: unknown log format; use .csv/.tsv/.parquet/.jsonl (.gz for text)")
    return path
