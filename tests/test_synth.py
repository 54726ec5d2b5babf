from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from livemb.core.errors import ConfigError
from livemb.tools.data.eventlog import dataset_stats, read_log, session_ids
from livemb.tools.data.synth import synth_log, write_log


@pytest.fixture(scope="module")
def synth() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    return synth_log(users=200, items=500, days=14, seed=3)


def test_deterministic_by_seed() -> None:
    a = synth_log(users=30, items=100, seed=7)
    b = synth_log(users=30, items=100, seed=7)
    c = synth_log(users=30, items=100, seed=8)
    pd.testing.assert_frame_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert not a[0]["item_id"].equals(c[0]["item_id"])


def test_shape_and_types(synth) -> None:
    df, ids, vec = synth
    assert list(df.columns) == ["user_id", "item_id", "ts", "event_type", "event_id"]
    assert ids.shape == (500,) and vec.shape == (500, 32) and vec.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    assert df["ts"].is_monotonic_increasing and df["ts"].dtype == np.int64
    assert set(df["item_id"]) <= set(ids)
    assert df["user_id"].nunique() == 200
    assert df["event_id"].is_unique
    assert (df["ts"].max() - df["ts"].min()) <= 14 * 86_400_000
    share = df["event_type"].value_counts(normalize=True)
    assert 0.8 < share["click"] < 0.93 and 0.06 < share["cart"] < 0.14 and 0.01 < share["purchase"] < 0.06


def test_session_timing(synth) -> None:
    df, _, _ = synth
    gaps = df.sort_values(["user_id", "ts"], kind="stable").groupby("user_id")["ts"].diff().dropna()
    # Inside a session 10-120 s; between sessions more than 1 h; nothing in between.
    assert gaps.min() >= 10_000
    assert not ((gaps > 120_000) & (gaps <= 3_600_000)).any()
    sess = session_ids(df, gap_ms=3_600_000)
    lengths = df.assign(s=sess).groupby(["user_id", "s"]).size()
    assert lengths.min() >= 2 and lengths.max() <= 15
    assert df.assign(s=sess).groupby("user_id")["s"].max().min() >= 2  # several sessions per user


def test_planted_structure(synth) -> None:
    df, ids, vec = synth
    pos = pd.Series(np.arange(len(ids)), index=ids)
    d = df.assign(s=session_ids(df, 3_600_000)).sort_values(["user_id", "ts"], kind="stable")
    v = vec[pos[d["item_id"]].to_numpy()]
    same_sess = (d["user_id"].values[1:] == d["user_id"].values[:-1]) & (d["s"].values[1:] == d["s"].values[:-1])
    cos_session = (v[1:] * v[:-1]).sum(1)[same_sess].mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(len(ids), size=(2, 5000))
    cos_random = (vec[a] * vec[b]).sum(1).mean()
    assert cos_session > cos_random + 0.3  # in-session items share a topic far more than chance

    # Long-term taste: a user's items concentrate on few topics, so their vectors are closer across
    # sessions too than items of two different users.
    centroid = pd.DataFrame(v).groupby(d["user_id"].to_numpy()).mean().to_numpy()
    centroid = centroid / np.linalg.norm(centroid, axis=1, keepdims=True)
    sim = centroid @ centroid.T
    assert np.diag(sim).mean() > sim[~np.eye(len(sim), dtype=bool)].mean() + 0.3

    stats = dataset_stats(df, gap_ms=3_600_000)
    assert 0.2 < stats["repeat_fraction"] < 0.5
    # Popularity skew: the top 10 % of items get far more than 10 % of the clicks.
    counts = df["item_id"].value_counts().to_numpy()
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.2


@pytest.mark.parametrize("name", ["log.csv", "log.parquet", "log.jsonl", "sub/log.csv.gz"])
def test_write_log_round_trip(tmp_path: Path, name: str) -> None:
    df, _, _ = synth_log(users=20, items=60, seed=1)
    path = write_log(df, tmp_path / name)
    back = read_log(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_write_log_adds_event_ids(tmp_path: Path) -> None:
    df = pd.DataFrame({"user_id": ["a", "b", "a"], "item_id": ["x", "y", "z"], "ts": [1, 2, 3]})
    back = read_log(write_log(df, tmp_path / "x.csv"))
    assert back["event_id"].tolist() == ["a-0", "b-0", "a-1"]
    with pytest.raises(ConfigError, match="unknown log format"):
        write_log(df, tmp_path / "x.xlsx")


def test_ecommerce_profile_plants_the_repeat_structure() -> None:
    """`livemb synth --profile ecommerce`: the facts of issue 8, measured on the generated log."""
    from livemb.tools.data.eventlog import repeat_profile
    from livemb.tools.data.synth_ecommerce import synth_ecommerce

    df, ids, vec = synth_ecommerce(users=400, items=20000, days=30, seed=0)
    a, _, _ = synth_ecommerce(users=40, items=2000, days=30, seed=5)
    b, _, _ = synth_ecommerce(users=40, items=2000, days=30, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert list(df.columns) == ["user_id", "item_id", "ts", "event_type", "event_id"]
    assert df["ts"].is_monotonic_increasing and vec.shape == (20000, 32)
    p = repeat_profile(df, 1_800_000)
    # measured (seed 0): repeats 0.253; within 5/10/20/50 events 0.45/0.60/0.74/0.90; 0.70 cross a
    # session break; view 0.906; 15 sessions of 3 events (medians); 0.757 of test events unseen
    assert 0.20 <= p["repeat_share"] <= 0.30
    w = p["repeat_within"]
    assert 0.40 <= w[5] <= 0.60 and 0.55 <= w[10] <= 0.70 and 0.68 <= w[20] <= 0.82 and 0.85 <= w[50] <= 0.95
    assert 0.45 <= p["repeat_cross_session"] <= 0.75
    t = p["event_types"]
    assert 0.87 <= t["view"] <= 0.93 and 0.03 <= t["cart"] <= 0.07 and 0.01 <= t["purchase"] <= 0.03
    assert 12 <= p["sessions_per_user_median"] <= 18 and p["session_length_median"] == 3
    assert 0.65 <= p["test_unseen_item_share"] <= 0.85
    assert p["max_user_events"] >= 1000  # a heavy tail of active users
