"""Item vectors from co-occurrence, for data that ships none (`livemb item-embeddings`).

Items co-occur when they are within `window` positions of each other in a user's time-ordered
sequence. The count matrix is turned into PPMI and factorised with a truncated SVD (Levy & Goldberg
2014: this approximates skip-gram).

Three kinds:
- "symmetric": unordered pairs; vectors = U * sqrt(S), L2-normalised. <x_a, x_b> is "a and b appear
  together".
- "symmetric+pop" (default): the symmetric vectors of dim - 1 plus one coordinate, the item's
  standardised log training count. PPMI divides popularity out, and with unit-norm vectors
  <u, x_i> cannot rank a popular item above a rare one in the same direction; the extra coordinate
  gives the explore score an additive popularity term whose weight (u's last coordinate) each
  model learns per context. Measured with an earlier model: YooChoose-100k
  recall@10 hiertcn +0.025, gru +0.011, hgru +0.004; ML-100K hiertcn +0.006.
- "directed": ordered pairs (a before b) give a non-symmetric PPMI M ~ U S V^T; vectors =
  [U sqrt(S) ; V sqrt(S)] (dim/2 each, the "source" and "target" halves, as word2vec's input and
  output vectors), L2-normalised. <x_a, x_b> still measures similarity, and a linear map that
  moves the source half into the target half scores "b follows a" -- a direction the sequence
  models can learn, while sr/sknn read it from exact counts. Measured on YooChoose-100k at 64-d it
  lost to "symmetric" (docs/RESULTS.md), hence not the default: each half gets only dim/2.

Item categories (a log's optional `category` column): one node per category joins the symmetric
kinds' graph, linked to each of its items (CATEGORY_NODE_WEIGHT x the item's events), and is dropped
after the SVD. Items of one category then share a direction, so the explore score <u, x_i> can reach
same-category items it has rarely seen together with the user's. The directed kind has no such
nodes. The table also stores each item's category for the repeat path (`item_categories`).

Only the given frame is used; evaluation passes its train part so no test information leaks.
Without scipy the sparse products are plain numpy (np.bincount per column), which is enough for
catalogues of a few hundred thousand items.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd

from livemb.core.choices import ITEM_VECTOR_KINDS
from livemb.core.errors import ConfigError, DataError
from livemb.core.items import ItemTable
from livemb.tools.data.eventlog import temporal_split

log = logging.getLogger(__name__)

DENSE_MAX_ITEMS = 5000  # up to here the PPMI matrix is held dense (<= 100 MB float32)
OVERSAMPLE = 10
POWER_ITERS = 4
KINDS = ITEM_VECTOR_KINDS
RECENT_FRACTION = 0.1  # symmetric+pop+recent: "recent" = the last 10 % of the given frame's time range
DEFAULT_KIND = KINDS[0]
# A log with item categories adds one node per category to the co-occurrence graph, linked to each
# of its items with this weight x the item's count (the symmetric kinds). Measured on taobao-dev,
# HierTCN seed 0 (docs/RESULTS.md): weights 1 / 10 / 30 gave recall@10 0.4432 / 0.4459 / 0.4436
# against 0.4417 without; 10 is the middle of that range.
CATEGORY_NODE_WEIGHT = 10.0


def _with_category_nodes(a: np.ndarray, b: np.ndarray, c: np.ndarray, item_codes: np.ndarray,
                         categories: np.ndarray, n_items: int, weight: float) -> tuple:
    """The pairs (a, b, counts c) plus an edge from each item to its category's node (numbered from
    n_items on) with `weight` x the item's events in that category, and the new node count. Items of
    one category then share a direction: a rare item, with few co-occurrences, mostly its category's."""
    has = categories != ""
    if not has.any():
        return a, b, c, n_items
    cat_codes, cat_names = pd.factorize(categories[has])
    n_cats = len(cat_names)
    keys, counts = np.unique(item_codes[has].astype(np.int64) * n_cats + cat_codes, return_counts=True)
    return (np.r_[a, keys // n_cats], np.r_[b, n_items + keys % n_cats], np.r_[c, weight * counts.astype(np.float64)],
            n_items + n_cats)


def _cooccurrence_pairs(
    users: np.ndarray, items: np.ndarray, window: int, ordered: bool = False
) -> tuple[np.ndarray, ...]:
    """Counts of item pairs within `window` positions of the same user: unordered (a < b), or
    ordered (a before b) when `ordered`."""
    a_parts, b_parts = [], []
    for d in range(1, window + 1):  # a loop over offsets, not events
        same = users[d:] == users[:-d]
        a, b = items[:-d][same], items[d:][same]
        keep = a != b  # re-clicks of one item carry no similarity signal
        a, b = a[keep], b[keep]
        a_parts.append(a if ordered else np.minimum(a, b))
        b_parts.append(b if ordered else np.maximum(a, b))
    a = np.concatenate(a_parts)
    b = np.concatenate(b_parts)
    n = int(items.max()) + 1 if len(items) else 0
    keys, counts = np.unique(a * np.int64(n) + b, return_counts=True)
    return keys // n, keys % n, counts.astype(np.float64)


def _ppmi(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """PPMI entries from counts (for the symmetric kind, given in full: both triangles)."""
    row_marg = np.bincount(rows, weights=vals, minlength=n)
    col_marg = np.bincount(cols, weights=vals, minlength=n)
    total = vals.sum()
    pmi = np.log(vals) + np.log(total) - np.log(row_marg[rows]) - np.log(col_marg[cols])
    pos = pmi > 0
    return rows[pos], cols[pos], pmi[pos]


def _matmul_factory(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int):
    """(A @ B, A^T @ B) for the sparse n x n A: dense BLAS for small n, scipy or numpy otherwise."""
    if n <= DENSE_MAX_ITEMS:
        dense = np.zeros((n, n), dtype=np.float32)
        dense[rows, cols] = vals
        return (lambda b: (dense @ b.astype(np.float32)).astype(np.float64),
                lambda b: (dense.T @ b.astype(np.float32)).astype(np.float64))
    try:
        import scipy.sparse as sp

        mat = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
        mat_t = mat.T.tocsr()
        return lambda b: np.asarray(mat @ b), lambda b: np.asarray(mat_t @ b)
    except ImportError:
        pass

    def product(r: np.ndarray, c: np.ndarray):
        def matmul(b: np.ndarray) -> np.ndarray:
            out = np.empty((n, b.shape[1]))
            for k in range(b.shape[1]):  # loop over the k columns; each is one vectorised pass over nnz
                out[:, k] = np.bincount(r, weights=vals * b[c, k], minlength=n)
            return out
        return matmul

    return product(rows, cols), product(cols, rows)


def _randomized_svd(matmul, rmatmul, n: int, k: int, rng: np.random.Generator):
    """Top-k U, S, V of an n x n matrix given only products with A and A^T (Halko et al. 2011)."""
    p = min(n, k + OVERSAMPLE)
    q, _ = np.linalg.qr(matmul(rng.normal(size=(n, p))))
    for _ in range(POWER_ITERS):
        q, _ = np.linalg.qr(rmatmul(q))
        q, _ = np.linalg.qr(matmul(q))
    bt = rmatmul(q)  # = (Q^T A)^T
    ub, s, vt = np.linalg.svd(bt.T, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vt[:k].T


def build_item_vectors(
    train_df: pd.DataFrame, dim: int = 64, window: int = 5, seed: int = 0, min_count: int = 1,
    kind: str = DEFAULT_KIND, category_weight: float = CATEGORY_NODE_WEIGHT,
) -> ItemTable:
    """PPMI-SVD item vectors from the interactions in `train_df` (user_id, item_id, ts, and the
    optional category: category nodes join the graph unless `category_weight` is 0 or the kind is
    directed)."""
    if kind not in KINDS:
        raise ConfigError(f"build_item_vectors: kind must be one of {KINDS}, got {kind!r}")
    missing = [c for c in ("user_id", "item_id", "ts") if c not in train_df.columns]
    if missing:
        raise DataError(f"build_item_vectors: missing column(s) {missing}")
    if len(train_df) == 0:
        raise DataError("build_item_vectors: no interactions")
    if dim < 1 or window < 1 or min_count < 1:
        raise ConfigError("build_item_vectors: dim, window and min_count must be >= 1")
    n_pop = {"symmetric+pop": 1, "symmetric+pop+recent": 2}.get(kind, 0)
    if n_pop and dim <= n_pop:
        raise ConfigError(f"build_item_vectors: {kind} needs dim > {n_pop} ({n_pop} coordinate(s) are popularity)")
    if kind == "directed" and dim % 2:
        raise ConfigError(f"build_item_vectors: directed vectors need an even dim (two halves), got {dim}")

    # Rare items are dropped before windowing (as word2vec's min_count), closing the gap they leave.
    counts = train_df["item_id"].value_counts()
    keep = train_df["item_id"].map(counts).to_numpy() >= min_count
    df = train_df.loc[keep, [col for col in ("user_id", "item_id", "ts", "category") if col in train_df.columns]]
    item_codes, item_ids = pd.factorize(df["item_id"], sort=True)
    user_codes, _ = pd.factorize(df["user_id"], sort=False)
    order = np.lexsort((np.arange(len(df)), df["ts"].to_numpy(), user_codes))  # by user, then time
    users, items = user_codes[order], item_codes[order].astype(np.int64)
    log.info("item-embeddings: %d events, %d users, %d items (min_count=%d, dropped %d rare items)",
             len(df), user_codes.max() + 1 if len(df) else 0, len(item_ids), min_count,
             int((counts < min_count).sum()))

    directed = kind == "directed"
    a, b, c = _cooccurrence_pairs(users, items, window, ordered=directed)
    if len(a) == 0:
        raise DataError("build_item_vectors: no two distinct items co-occur within any user's window")
    n_nodes = len(item_ids)
    if category_weight > 0 and not directed and "category" in df.columns:
        a, b, c, n_nodes = _with_category_nodes(a, b, c, item_codes, df["category"].to_numpy(dtype=str),
                                                len(item_ids), category_weight)
    # PPMI (the symmetric kind lists both triangles); items left with no entry carry no signal.
    # Item nodes come first (0..n_items-1), category nodes after; only item rows are kept below.
    if directed:
        rows, cols, vals = _ppmi(a, b, c, n_nodes)
    else:
        rows, cols, vals = _ppmi(np.r_[a, b], np.r_[b, a], np.r_[c, c], n_nodes)
    present_nodes = np.zeros(n_nodes, dtype=bool)
    present_nodes[rows] = True
    present_nodes[cols] = True
    present = present_nodes[: len(item_ids)]
    n_present = int(present.sum())  # items with an entry; the nodes after them are categories
    n = int(present_nodes.sum())
    if n <= dim:
        raise DataError(
            f"build_item_vectors: only {n} items{' and categories' if n_nodes > len(item_ids) else ''} have "
            f"co-occurrences, not more than dim={dim}; "
            f"use a smaller --dim (below {n})"
        )
    remap = np.cumsum(present_nodes) - 1
    rows, cols = remap[rows], remap[cols]
    log.info("item-embeddings: %d of %d items with co-occurrences (or a category node), %d category nodes, "
             "%d PPMI entries, dim=%d (%s)",
             n_present, len(item_ids), n - n_present, len(vals), dim, kind)

    rng = np.random.default_rng(seed)
    k = dim // 2 if directed else dim - n_pop
    u, s, v = _randomized_svd(*_matmul_factory(rows, cols, vals, n), n, k, rng)
    u, v = u[:n_present], v[:n_present]  # drop the category nodes' rows
    # Deterministic signs: the largest-magnitude entry of each column of U is positive (V follows).
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    vec = u * signs * np.sqrt(s)
    if directed:
        vec = np.concatenate([vec, v * signs * np.sqrt(s)], axis=1)
    norms = np.linalg.norm(vec, axis=1)
    ok = norms > 1e-12
    if not ok.all():
        log.warning("item-embeddings: %d items got a zero vector and are left out", int((~ok).sum()))
    vec = vec[ok] / norms[ok, None]
    ids = np.asarray(item_ids, dtype=str)[present][ok]
    if n_pop:
        # last coordinate: standardised log training count, so <u, x_i> can carry an additive
        # popularity term (u's last coordinate, learned per context); PPMI removes popularity
        logc = np.log(counts.loc[np.asarray(item_ids)[present][ok]].to_numpy(np.float64))
        z = (logc - logc.mean()) / max(logc.std(), 1e-9)
        vec = np.concatenate([vec, z[:, None]], axis=1)
    if n_pop == 2:  # + the standardised log(1 + count) in the frame's most recent stretch (trend)
        ts = df["ts"].to_numpy()
        cut = ts.min() + (1.0 - RECENT_FRACTION) * (ts.max() - ts.min())
        recent = df.loc[ts >= cut, "item_id"].value_counts()
        r = np.log1p(recent.reindex(np.asarray(item_ids)[present][ok]).fillna(0).to_numpy(np.float64))
        vec = np.concatenate([vec, ((r - r.mean()) / max(r.std(), 1e-9))[:, None]], axis=1)
    log.info("item-embeddings: %d vectors of dim %d", len(ids), dim)
    return ItemTable(ids, vec.astype(np.float32), item_categories(train_df, ids))


def item_categories(df: pd.DataFrame, ids: np.ndarray) -> np.ndarray | None:
    """Each of `ids`' category in the log's `category` column (its latest non-empty value; "" for
    none), or None when the log has no such column."""
    if "category" not in df.columns:
        return None
    known = df.loc[df["category"] != "", ["item_id", "category"]]
    latest = known.groupby("item_id", sort=False)["category"].last()  # df is time-sorted
    cats = latest.reindex(pd.Index(ids, dtype=object)).fillna("").to_numpy(dtype=str)
    log.info("item-embeddings: %d of %d items with a category (%d categories)", int((cats != "").sum()), len(cats),
             len(set(cats.tolist()) - {""}))
    return cats


def items_for(df: pd.DataFrame, items_path: str | None, dim: int, train_only: bool = True,
              kind: str = DEFAULT_KIND) -> ItemTable:
    """The given item table, or vectors built from the train part of `df` only (no test leakage)."""
    if items_path:
        return ItemTable.load(items_path)
    train_df = temporal_split(df)[0] if train_only else df
    log.info("building %d-d %s item vectors from %d training events", dim, kind, len(train_df))
    return build_item_vectors(train_df, dim=dim, kind=kind)


def vectors_before(train_df: pd.DataFrame, table: ItemTable, kind: str = DEFAULT_KIND):
    """cut_ms -> (N+1, D) vectors of `table`'s items rebuilt as `table` was (PPMI-SVD of `kind`, its
    dim) from the events of `train_df` before cut_ms only; items absent there get zeros. Early
    stopping chooses on them (models/train.train_model) so that its held-out tail is unseen."""

    @functools.lru_cache(maxsize=2)  # `livemb evaluate` asks once per model, at the same cut
    def build(cut_ms: int) -> np.ndarray | None:
        try:
            part = build_item_vectors(train_df[train_df["ts"] < cut_ms], dim=table.dim, kind=kind)
        except DataError as e:  # too little before the tail: choose on the table's own vectors
            log.warning("item-embeddings: no vectors from before the held-out tail (%s); early stopping uses the "
                        "table's own", e)
            return None
        out = np.zeros((len(table) + 1, table.dim), np.float32)
        idx = table.lookup(part.ids)
        out[idx[idx > 0]] = part.vectors[idx > 0]
        log.info("item-embeddings: %d of %d items have vectors from before the held-out tail", int((idx > 0).sum()),
                 len(table))
        return out

    return build
