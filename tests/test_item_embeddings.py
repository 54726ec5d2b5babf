from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import livemb.tools.data.item_embeddings as ie
from livemb.core.errors import ConfigError, DataError
from livemb.tools.data.eventlog import parse_columns, read_log, session_ids, temporal_split
from livemb.tools.data.item_embeddings import build_item_vectors
from livemb.tools.data.synth import synth_log

YOOCHOOSE = Path("/work/shared/data/yoochoose-100k/yoochoose-clicks-100k_train_full.txt")
TAOBAO = Path("/work/shared/data/taobao-dev/UserBehavior_dev.csv")


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame]:
    df, _, _ = synth_log(users=200, items=500, seed=5)
    return temporal_split(df, test_frac=0.2)


def _consecutive_vs_random(df: pd.DataFrame, table) -> tuple[float, float]:
    d = df.assign(s=session_ids(df, 3_600_000)).sort_values(["user_id", "ts"], kind="stable")
    ix = table.lookup(d["item_id"].to_numpy())
    pv = table.padded_vectors()
    m = (
        (d["user_id"].values[1:] == d["user_id"].values[:-1])
        & (d["s"].values[1:] == d["s"].values[:-1])
        & (ix[1:] > 0) & (ix[:-1] > 0) & (ix[1:] != ix[:-1])
    )
    co = float((pv[ix[1:]] * pv[ix[:-1]]).sum(1)[m].mean())
    a, b = np.random.default_rng(0).integers(1, len(table) + 1, size=(2, 5000))
    return co, float((pv[a] * pv[b]).sum(1).mean())


@pytest.mark.parametrize("kind", ["directed", "symmetric"])
def test_cooccurring_items_are_closer(split, kind) -> None:
    train, _ = split
    table = build_item_vectors(train, dim=16, seed=0, kind=kind)
    assert table.dim == 16 and table.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(table.vectors, axis=1), 1.0, atol=1e-5)
    co, rand = _consecutive_vs_random(train, table)
    assert co > rand + 0.3


def test_no_test_only_item_gets_a_vector(split) -> None:
    train, test = split
    test = test.copy()
    test.loc[test.index[:50], "item_id"] = [f"test-only-{k}" for k in range(50)]
    table = build_item_vectors(train, dim=16)
    assert not set(table.ids) - set(train["item_id"])
    assert table.lookup(test["item_id"].to_numpy()[:50]).max() == 0
    # Same input -> same vectors (seeded range finder, fixed signs).
    again = build_item_vectors(train, dim=16)
    assert again.fingerprint == table.fingerprint


def test_directed_halves_know_which_item_comes_first(split) -> None:
    # The synthetic sessions walk forward around their topic's ring: source half of a . target
    # half of b must score "b after a" above "a after b".
    train, _ = split
    table = build_item_vectors(train, dim=64, kind="directed")  # 32 per half: room for 10 topic rings
    k = table.dim // 2
    d = train.sort_values(["user_id", "ts"], kind="stable")
    ix = table.lookup(d["item_id"].to_numpy())
    pv = table.padded_vectors()
    user, ts = d["user_id"].to_numpy(), d["ts"].to_numpy()
    in_session = (user[1:] == user[:-1]) & (ts[1:] - ts[:-1] < 1_800_000)
    m = in_session & (ix[1:] > 0) & (ix[:-1] > 0) & (ix[1:] != ix[:-1])
    a, b = ix[:-1][m], ix[1:][m]
    forward = (pv[a, :k] * pv[b, k:]).sum(1)
    backward = (pv[b, :k] * pv[a, k:]).sum(1)
    assert (forward > backward).mean() > 0.7
    with pytest.raises(ConfigError, match="even dim"):
        build_item_vectors(train, dim=7, kind="directed")
    with pytest.raises(ConfigError, match="kind must be one of"):
        build_item_vectors(train, dim=8, kind="skipgram")


@pytest.mark.parametrize("kind", ["directed", "symmetric"])
def test_sparse_path_matches_dense(split, monkeypatch, kind) -> None:
    train, _ = split
    dense = build_item_vectors(train, dim=8, kind=kind)
    monkeypatch.setattr(ie, "DENSE_MAX_ITEMS", 10)
    sparse = build_item_vectors(train, dim=8, kind=kind)
    np.testing.assert_array_equal(dense.ids, sparse.ids)
    assert np.abs((dense.vectors * sparse.vectors).sum(1)).min() > 0.99


def test_min_count_and_window() -> None:
    df = pd.DataFrame(
        {
            "user_id": ["u"] * 6 + ["v"] * 6,
            "item_id": list("abcdef") + list("abcdez"),
            "ts": list(range(12)),
        }
    )
    table = build_item_vectors(df, dim=2, window=2, min_count=2)
    assert sorted(table.ids) == ["a", "b", "c", "d", "e"]  # f and z are seen once


def test_categories_go_into_the_table_latest_value_per_item() -> None:
    df = pd.DataFrame(
        {
            "user_id": ["u"] * 6 + ["v"] * 6,
            "item_id": list("abcdef") + list("abcdez"),
            "ts": list(range(12)),
            "category": ["x", "x", "y", "", "y", "y"] + ["x", "w", "y", "", "y", "y"],
        }
    )
    table = build_item_vectors(df, dim=2, window=2)
    got = dict(zip(table.ids.tolist(), table.categories.tolist(), strict=True))
    assert got == {"a": "x", "b": "w", "c": "y", "d": "", "e": "y", "f": "y", "z": "y"}  # b: its latest
    assert build_item_vectors(df.drop(columns="category"), dim=2, window=2).categories is None


def _with_random_categories(train: pd.DataFrame, n_cats: int = 10) -> pd.DataFrame:
    """A category per item drawn at random: unrelated to who clicks what, so only the category
    nodes can bring one category's items together."""
    items = np.sort(train["item_id"].unique())
    cat = dict(zip(items, np.random.default_rng(3).integers(0, n_cats, len(items)).astype(str), strict=True))
    return train.assign(category=train["item_id"].map(cat))


def _same_category_cosine(table) -> tuple[float, float]:
    """Mean <x_a, x_b> over pairs of distinct items of one category, and over all pairs (the
    co-occurrence coordinates: the default kind's last one is popularity)."""
    vectors = table.vectors[:, :-1]
    gram = vectors @ vectors.T
    same = table.categories[:, None] == table.categories[None, :]
    np.fill_diagonal(same, False)
    off = ~np.eye(len(table), dtype=bool)
    return float(gram[same].mean()), float(gram[off].mean())


def test_category_nodes_pull_one_categorys_items_together(split) -> None:
    train = _with_random_categories(split[0])
    plain = build_item_vectors(train, dim=16, category_weight=0)
    with_nodes = build_item_vectors(train, dim=16)  # the default weight
    # Weight 0 is the table of a log without categories (the vectors exactly; the table keeps categories).
    np.testing.assert_array_equal(plain.vectors, build_item_vectors(train.drop(columns="category"), dim=16).vectors)
    np.testing.assert_array_equal(plain.ids, with_nodes.ids)  # category nodes are not items
    same0, all0 = _same_category_cosine(plain)
    same1, all1 = _same_category_cosine(with_nodes)
    assert same0 - all0 < 0.01  # random categories: no closer than any pair (measured -0.001)
    assert same1 - all1 > 0.02  # measured 0.033 (weight 30: 0.115); this log's co-occurrence is dense
    # Co-occurrence still shapes the vectors.
    co, rand = _consecutive_vs_random(train, with_nodes)
    assert co > rand + 0.2
    # The directed kind adds no nodes: the same vectors as without categories.
    np.testing.assert_array_equal(build_item_vectors(train, dim=16, kind="directed").vectors,
                                  build_item_vectors(train, dim=16, kind="directed", category_weight=0).vectors)


def test_an_item_with_no_co_occurrence_gets_its_categorys_direction(split) -> None:
    train = _with_random_categories(split[0])
    a_cat = train["category"].iloc[0]
    lonely = pd.DataFrame({"user_id": ["lonely-user"], "item_id": ["lonely-item"], "ts": [train["ts"].max()],
                           "category": [a_cat]})
    df = pd.concat([train, lonely], ignore_index=True)
    assert "lonely-item" not in build_item_vectors(df, dim=16, category_weight=0).ids  # no co-occurrence
    table = build_item_vectors(df, dim=16)
    x = table.padded_vectors()[table.lookup(np.array(["lonely-item"]))[0]]
    others = table.ids != "lonely-item"
    sims = table.vectors[others, :-1] @ x[:-1]  # the co-occurrence part (the last coordinate is popularity)
    same = table.categories[others] == a_cat
    assert sims[same].mean() > sims[~same].mean() + 0.15  # measured 0.26 against 0.01


def test_too_few_co_occurring_items_or_a_missing_column_are_refused() -> None:
    tiny = pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "b", "c"], "ts": [1, 2, 3]})
    with pytest.raises(DataError, match=r"only 3 items have co-occurrences.*smaller --dim"):
        build_item_vectors(tiny, dim=8)
    alone = pd.DataFrame({"user_id": ["u", "v"], "item_id": ["a", "b"], "ts": [1, 2]})
    with pytest.raises(DataError, match="no two distinct items co-occur"):
        build_item_vectors(alone, dim=2)
    with pytest.raises(DataError, match="missing column"):
        build_item_vectors(tiny.drop(columns="ts"))


@pytest.mark.skipif(not YOOCHOOSE.exists(), reason="yoochoose sample not present")
def test_yoochoose_sample() -> None:
    df = read_log(YOOCHOOSE, parse_columns("user=SessionId,item=ItemId,ts=Time"), ts_unit="s")
    table = build_item_vectors(df, dim=32)
    assert len(table) > 0.9 * df["item_id"].nunique()
    co, rand = _consecutive_vs_random(df, table)
    assert co > rand + 0.2


@pytest.mark.skipif(not TAOBAO.exists(), reason="taobao-dev not present")
def test_taobao_categories_give_their_items_a_direction() -> None:
    """Real shopping clicks: 78 % of the train part's items are seen once, so co-occurrence alone
    barely ties one category's items together; the category nodes do (measured: mean cosine of two
    items of one category 0.05 without, 0.55 with; of two categories 0.006 and 0.011)."""
    df = read_log(TAOBAO, parse_columns("user=user_id,item=item_id,ts=timestamp,event_type=behavior"), ts_unit="s")
    train, _ = temporal_split(df)
    gaps = []
    for weight in (0.0, ie.CATEGORY_NODE_WEIGHT):
        table = build_item_vectors(train, dim=64, category_weight=weight)
        vectors, cats = table.vectors[:, :-1], table.categories  # the last coordinate is popularity
        a, b = np.random.default_rng(0).integers(0, len(table), size=(2, 100_000))
        a, b = a[a != b], b[a != b]
        cos = (vectors[a] * vectors[b]).sum(1)
        same = cats[a] == cats[b]
        gaps.append(cos[same].mean() - cos[~same].mean())
    assert gaps[0] < 0.1, gaps
    assert gaps[1] > 0.3, gaps


def test_popularity_coordinate(split) -> None:
    """symmetric+pop: the symmetric vectors of dim-1 plus the standardised log training count."""
    train, _ = split
    sym = build_item_vectors(train, dim=15, seed=0, kind="symmetric")
    pop = build_item_vectors(train, dim=16, seed=0, kind="symmetric+pop")
    assert list(pop.ids) == list(sym.ids) and pop.dim == 16
    np.testing.assert_allclose(pop.vectors[:, :15], sym.vectors, atol=1e-6)
    logc = np.log(train["item_id"].value_counts().loc[pop.ids].to_numpy(np.float64))
    np.testing.assert_allclose(pop.vectors[:, 15], (logc - logc.mean()) / logc.std(), atol=1e-5)


def test_recent_popularity_coordinate(split) -> None:
    """symmetric+pop+recent: + the standardised log(1 + count) over the last 10 % of the time range."""
    train, _ = split
    pop = build_item_vectors(train, dim=15, seed=0, kind="symmetric+pop")
    both = build_item_vectors(train, dim=16, seed=0, kind="symmetric+pop+recent")
    np.testing.assert_allclose(both.vectors[:, :15], pop.vectors, atol=1e-6)
    ts = train["ts"].to_numpy()
    late = train[ts >= ts.min() + 0.9 * (ts.max() - ts.min())]
    r = np.log1p(late["item_id"].value_counts().reindex(both.ids).fillna(0).to_numpy(np.float64))
    np.testing.assert_allclose(both.vectors[:, 15], (r - r.mean()) / r.std(), atol=1e-5)
