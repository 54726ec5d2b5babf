"""`livemb synth --profile ecommerce`: a click log shaped like a real e-commerce log.

What is planted (measured on the generated log by `tools.data.eventlog.repeat_profile`, see
tests/test_synth.py and docs/RESULTS.md):
- about a quarter of the events re-touch an item the user touched before; the distance back to
  the source event is drawn so that half are within 5 events, ~63 % within 10, ~75 % within 20,
  ~89 % within 50 (a 16-slot memory misses a quarter of them); about half cross a session break;
- event types ~90 % view / 5 % cart / 3 % favourite / 2 % purchase; repeats are more often carts
  and purchases; a repeat prefers a source that was carted or favourited, and an item whose last
  touch was a purchase is rarely touched again (the re-touch is redrawn as a new item);
- users: lognormal activity (median 15 sessions of median length 3, a long tail of heavy users);
- a long tail of new items: most new (non-repeat) clicks go to items that arrived in the
  catalogue in the last few days, so most test events are items never seen in training;
- long-term taste (1-3 topics) and one intent topic per session, as in the default profile; item
  vectors = topic centroid + noise (the planted vectors are written with --items-out).
- optional, for measuring the event-type signal (`cart_return` > 0, `livemb synth --cart-return P`):
  the event right after a cart returns to the carted item with probability P (checking it out
  again, buying it), and every re-touch after a purchase is redrawn as a new item. The default
  (0) leaves the realistic profile above unchanged.
Deterministic by seed, vectorised over all events (one pass per redraw round, no per-user loop).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from livemb.core.errors import ConfigError
from livemb.tools.data.synth import T0_MS

SESSIONS_MEDIAN, SESSIONS_SIGMA, SESSIONS_MAX = 15, 1.1, 800
LENGTH_MEDIAN, LENGTH_SIGMA, LENGTH_MAX = 3, 0.75, 60
CLICK_GAP_MS = (5_000, 150_000)
MIN_BREAK_MS = 1_860_000  # 31 min: every session start is a break at the default 30 min gap
P_REPEAT = 0.18  # before the purchase redraw, which turns some repeats into new items
# distance back to the source event: bucket probabilities and ranges (events)
DIST_BUCKETS = ((0.50, 1, 5), (0.13, 6, 10), (0.12, 11, 20), (0.13, 21, 50), (0.14, 51, 500))
DIST_IN_5 = (0.58, 0.2, 0.11, 0.07, 0.04)  # d = 1..5 inside the first bucket
TYPES = np.array(["view", "cart", "favourite", "purchase"])
TYPE_P_FRESH = (0.9267, 0.0333, 0.0233, 0.0167)
TYPE_P_REPEAT = (0.81, 0.10, 0.05, 0.04)
P_REDRAW_AFTER_PURCHASE = 0.85
P_NEW_ARRIVAL = 0.8  # a new click goes to an item that arrived in the last NEW_WINDOW_DAYS
NEW_WINDOW_DAYS = 2.0
STOCK_SHARE = 0.2  # items present from day 0 (the rest arrive uniformly over the log)
P_INTENT = 0.8  # a new click is from the session's intent topic (else any taste topic)
NOISE = 0.35
FRESH_REDRAWS = 6
STOCK_SKEW = 2.0  # popularity of stock items: rank = size * U^skew


def _items(rng: np.random.Generator, items: int, topics: int, dim: int):
    topic = rng.integers(topics, size=items)
    centroids = rng.normal(size=(topics, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    vec = centroids[topic] + rng.normal(size=(items, dim)) * (NOISE / np.sqrt(dim) * 3)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    stock = rng.random(items) < STOCK_SHARE
    return vec.astype(np.float32), topic, rng.random(items), stock


def _distances(rng: np.random.Generator, n: int) -> np.ndarray:
    p = np.array([b[0] for b in DIST_BUCKETS])
    b = rng.choice(len(DIST_BUCKETS), size=n, p=p / p.sum())
    lo = np.array([x[1] for x in DIST_BUCKETS])[b]
    hi = np.array([x[2] for x in DIST_BUCKETS])[b]
    d = np.floor(np.exp(np.log(lo) + rng.random(n) * (np.log(hi + 1) - np.log(lo)))).astype(np.int64)
    d = np.clip(d, lo, hi)
    in5 = b == 0
    d[in5] = 1 + rng.choice(5, size=int(in5.sum()), p=DIST_IN_5)
    return d


def synth_ecommerce(users: int = 400, items: int = 20000, days: float = 30.0, seed: int = 0, topics: int = 50,
                    dim: int = 32, cart_return: float = 0.0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """-> (events sorted by ts, item ids (str, N), planted item vectors (float32, N x dim))."""
    if users < 1 or items < topics or days <= 0 or not 0.0 <= cart_return <= 1.0:
        raise ConfigError("synth_ecommerce: need users >= 1, items >= topics, days > 0, 0 <= cart_return <= 1")
    rng = np.random.default_rng(seed)
    vec, item_topic, birth_u, stock = _items(rng, items, topics, dim)
    span = int(days * 86_400_000)

    # users and sessions (lognormal activity: a few heavy users)
    n_sess = np.clip(np.round(np.exp(np.log(SESSIONS_MEDIAN) + SESSIONS_SIGMA * rng.normal(size=users))), 1,
                     SESSIONS_MAX).astype(np.int64)
    n_taste = rng.integers(1, 4, size=users)
    taste_rank = np.argsort(rng.random((users, topics)), axis=1).argsort(axis=1)
    taste = np.where(taste_rank < n_taste[:, None], rng.gamma(1.0, size=(users, topics)), 0.0)
    taste /= taste.sum(1, keepdims=True)
    sess_user = np.repeat(np.arange(users), n_sess)
    S = len(sess_user)
    sess_len = np.clip(np.round(np.exp(np.log(LENGTH_MEDIAN) + LENGTH_SIGMA * rng.normal(size=S))), 1,
                       LENGTH_MAX).astype(np.int64)
    cdf_t = np.cumsum(taste, axis=1)
    sess_topic = np.minimum((rng.random(S)[:, None] > cdf_t[sess_user]).sum(1), topics - 1)

    # session start times: uniform over the span per user, pushed apart by > 30 min + duration
    first_sess = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
    ev_sess = np.repeat(np.arange(S), sess_len)
    E = len(ev_sess)
    ev_user = sess_user[ev_sess]
    sess_first_ev = np.concatenate([[0], np.cumsum(sess_len)[:-1]])
    gap = rng.integers(*CLICK_GAP_MS, size=E)
    gap[sess_first_ev] = 0
    c = np.cumsum(gap)
    in_sess = c - c[sess_first_ev][ev_sess]
    dur = in_sess[np.r_[sess_first_ev[1:], E] - 1]
    busy = np.add.reduceat(dur + MIN_BREAK_MS, first_sess)  # per user: sessions + the breaks they need
    free = np.maximum(span - busy, 0)
    raw = rng.random(S) * free[sess_user]
    start = raw[np.lexsort((raw, sess_user))].astype(np.int64)  # k-th smallest of user u -> its k-th session
    push = np.cumsum(dur + MIN_BREAK_MS) - (dur + MIN_BREAK_MS)
    start += push - push[first_sess][sess_user]  # every user's sessions fit in `days` (if busy < span)
    ts = T0_MS + start[ev_sess] + in_sess
    birth = np.where(stock, 0, birth_u * (ts.max() - T0_MS)).astype(np.int64)  # arrivals over the whole log

    # event types and repeat decisions
    user_first_ev = np.concatenate([[0], np.cumsum(np.bincount(ev_user, minlength=users))[:-1]])
    pos = np.arange(E) - user_first_ev[ev_user]  # index within the user
    is_rep = (rng.random(E) < P_REPEAT) & (pos > 0)
    etype = np.where(is_rep, rng.choice(4, size=E, p=TYPE_P_REPEAT), rng.choice(4, size=E, p=TYPE_P_FRESH))
    d1, d2 = _distances(rng, E), _distances(rng, E)
    d1 = np.where(d1 > pos, 1 + (rng.random(E) * np.maximum(pos, 1)).astype(np.int64), d1)
    d2 = np.where(d2 > pos, d1, d2)
    src2 = np.arange(E) - d2
    prefer2 = (etype[np.maximum(src2, 0)] == 1) | (etype[np.maximum(src2, 0)] == 2)  # carted / favourited
    src = np.where(is_rep, np.arange(E) - np.where(prefer2, d2, d1), np.arange(E))

    # new items: an arrival of the last few days in the session's topic, or stock by popularity
    topic = np.where(rng.random(E) < P_INTENT, sess_topic[ev_sess],
                     np.minimum((rng.random(E)[:, None] > cdf_t[ev_user]).sum(1), topics - 1))
    fresh = _new_items(rng, topic, ts - T0_MS, item_topic, birth, stock)
    # a new click should be new to the user: redraw clashes with the user's earlier new clicks
    new_pos = np.flatnonzero(~is_rep)
    for _ in range(FRESH_REDRAWS):
        clash = new_pos[pd.DataFrame({"u": ev_user[new_pos], "i": fresh[new_pos]}).duplicated().to_numpy()]
        if not len(clash):
            break
        fresh[clash] = _new_items(rng, topic[clash], ts[clash] - T0_MS, item_topic, birth, stock)

    def resolve(src: np.ndarray) -> np.ndarray:
        while True:  # pointer jumping: a repeat of a repeat copies the original
            nxt = src[src]
            if np.array_equal(nxt, src):
                return src
            src = nxt

    if cart_return > 0:  # the event after a cart goes back to the carted item (events are in user order)
        after_cart = (pos > 0) & (etype[np.maximum(np.arange(E) - 1, 0)] == 1) & (rng.random(E) < cart_return)
        src = np.where(after_cart, np.arange(E) - 1, src)
    item = fresh[resolve(src)]
    # an item whose previous touch was a purchase is rarely touched again: redraw most of those
    prev = pd.DataFrame({"u": ev_user, "i": item, "t": etype}).groupby(["u", "i"], sort=False)["t"].shift(1)
    p_redraw = 1.0 if cart_return > 0 else P_REDRAW_AFTER_PURCHASE
    redraw = (prev.to_numpy() == 3) & (rng.random(E) < p_redraw)
    src = np.where(redraw, np.arange(E), src)
    item = fresh[resolve(src)]

    ids = np.array([f"p{k}" for k in range(items)])
    uid = np.array([f"c{k}" for k in range(users)])
    df = pd.DataFrame({
        "user_id": uid[ev_user], "item_id": ids[item], "ts": ts.astype(np.int64), "event_type": TYPES[etype],
        "event_id": pd.Series(uid[ev_user]) + "-" + pd.Series(pos).astype(str),
    })
    return df.sort_values("ts", kind="stable", ignore_index=True), ids, vec


def _new_items(rng, topic: np.ndarray, t_ms: np.ndarray, item_topic: np.ndarray, birth: np.ndarray,
               stock: np.ndarray) -> np.ndarray:
    """One new item per event: an item of `topic` born in the last NEW_WINDOW_DAYS before t
    (uniform) with probability P_NEW_ARRIVAL, else a stock item of the topic (Zipf popularity)."""
    E = len(topic)
    T = int(item_topic.max()) + 1
    # arrivals sorted by (topic, birth): a searchsorted finds each event's window
    arr = np.flatnonzero(~stock)
    arr = arr[np.lexsort((birth[arr], item_topic[arr]))]
    key = item_topic[arr].astype(np.float64) * 1e15 + birth[arr]
    hi = np.searchsorted(key, topic * 1e15 + t_ms, side="right")
    lo = np.searchsorted(key, topic * 1e15 + np.maximum(t_ms - NEW_WINDOW_DAYS * 86_400_000, 0), side="left")
    pick_new = arr[np.minimum(lo + (rng.random(E) * np.maximum(hi - lo, 1)).astype(np.int64), len(arr) - 1)]
    has_new = hi > lo
    # stock by Zipf rank within the topic
    st = np.flatnonzero(stock)
    st = st[np.lexsort((rng.random(len(st)), item_topic[st]))]
    t_start = np.searchsorted(item_topic[st], np.arange(T))
    t_size = np.bincount(item_topic[st], minlength=T)
    z = np.floor(t_size[topic] * rng.random(E) ** STOCK_SKEW).astype(np.int64)  # rank 0 the most popular
    pick_stock = st[np.minimum(t_start[topic] + np.minimum(z, np.maximum(t_size[topic] - 1, 0)), len(st) - 1)]
    use_new = has_new & (rng.random(E) < P_NEW_ARRIVAL) | (t_size[topic] == 0)
    return np.where(use_new & has_new, pick_new, pick_stock)
