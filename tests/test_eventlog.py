from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from livemb.core.errors import ConfigError, DataError
from livemb.tools.data.eventlog import dataset_stats, parse_columns, read_log, session_ids, temporal_split

YOOCHOOSE = Path("/work/shared/data/yoochoose-100k/yoochoose-clicks-100k_test.txt")
GLOBO = Path("/work/shared/data/globo-fragment/clicks_hour_000_truncated.csv")
COLS = ["user_id", "item_id", "ts", "event_type", "event_id"]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "7", "u2"],
            "item_id": ["a", "b", "c", "123", "a"],
            "ts": [3000, 1000, 2000, 1000, 5000],
            "event_type": ["click", "cart", "click", "purchase", "click"],
            "event_id": ["e1", "e2", "e3", "e4", "e5"],
        }
    )


def test_parse_columns() -> None:
    assert parse_columns("user=SessionId, item=ItemId,ts=Time") == {
        "user": "SessionId", "item": "ItemId", "ts": "Time"}
    assert parse_columns("user_id=u,event_type=kind") == {"user": "u", "event_type": "kind"}
    with pytest.raises(ConfigError, match="unknown name 'colour'"):
        parse_columns("colour=red")
    with pytest.raises(ConfigError, match="expected NAME=SOURCE"):
        parse_columns("user")


@pytest.mark.skipif(not YOOCHOOSE.exists(), reason="yoochoose sample not present")
def test_read_yoochoose_sample() -> None:
    df = read_log(YOOCHOOSE, parse_columns("user=SessionId,item=ItemId,ts=Time"), ts_unit="s")
    assert list(df.columns) == COLS
    assert len(df) == 13568
    assert df["ts"].dtype == np.int64
    assert df["ts"].is_monotonic_increasing
    # First line of the file: 1	214536502	1396860669.277 (float seconds -> exact ms)
    row = df[(df["user_id"] == "1") & (df["item_id"] == "214536502")].iloc[0]
    assert row["ts"] == 1396860669277
    assert set(df["event_type"]) == {"click"} and set(df["event_id"]) == {""}
    assert not df["item_id"].str.contains(r"\.").any()


@pytest.mark.skipif(not GLOBO.exists(), reason="globo fragment not present")
def test_read_globo_fragment() -> None:
    df = read_log(GLOBO, {"user": "user_id", "item": "click_article_id", "ts": "click_timestamp"})
    assert len(df) == 318
    first = df[df["user_id"] == "0"].iloc[0]
    assert (first["item_id"], first["ts"]) == ("157541", 1506826828020)
    with pytest.raises(DataError, match=r"missing column 'item_id'.*available columns: user_id, session_id"):
        read_log(GLOBO)


@pytest.mark.parametrize("name", ["log.csv", "log.tsv", "log.parquet", "log.jsonl", "log.csv.gz", "log.jsonl.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    src = _frame()
    path = tmp_path / name
    if name.startswith("log.csv") or name == "log.tsv":
        src.to_csv(path, sep="\t" if name == "log.tsv" else ",", index=False)
    elif name == "log.parquet":
        src.to_parquet(path, index=False)
    else:
        src.to_json(path, orient="records", lines=True)
    df = read_log(path)
    assert list(df.columns) == COLS
    # Stable sort by ts: the two events at ts=1000 keep file order (u2 before 7).
    assert df["user_id"].tolist() == ["u2", "7", "u1", "u1", "u2"]
    assert df["ts"].tolist() == [1000, 1000, 2000, 3000, 5000]
    assert df["item_id"].tolist() == ["b", "123", "c", "a", "a"]
    assert df["event_id"].tolist() == ["e2", "e4", "e3", "e1", "e5"]


def test_integer_ids_and_optional_columns(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    pd.DataFrame({"u": [1, 2], "i": [10.0, 20.0], "t": [1.5, 2.5]}).to_parquet(path)
    df = read_log(path, {"user": "u", "item": "i", "ts": "t"}, ts_unit="s")
    assert df["user_id"].tolist() == ["1", "2"]
    assert df["item_id"].tolist() == ["10", "20"]
    assert df["ts"].tolist() == [1500, 2500]
    assert df["event_type"].tolist() == ["click", "click"]
    assert df["event_id"].tolist() == ["", ""]
    assert "category" not in df.columns  # only a log with one gets the column
    pd.DataFrame({"u": [1, 2, 3], "i": [10, 20, 30], "t": [1, 2, 3], "cat_id": [5.0, None, 7.0]}).to_parquet(path)
    cats = read_log(path, {"user": "u", "item": "i", "ts": "t", "category": "cat_id"})
    assert cats["category"].tolist() == ["5", "", "7"]  # integral floats as integers, a missing value ""
    # unmapped, a column named category or category_id (taobao's) is read; `category=` reads none
    pd.DataFrame({"u": [1, 2], "i": [10, 20], "t": [1, 2], "category_id": [5, 7]}).to_parquet(path)
    assert read_log(path, {"user": "u", "item": "i", "ts": "t"})["category"].tolist() == ["5", "7"]
    assert "category" not in read_log(path, parse_columns("user=u,item=i,ts=t,category=")).columns
    jl = tmp_path / "ints.jsonl"
    jl.write_text('{"user_id": 5, "item_id": 77, "ts": 10}\n{"user_id": "x", "item_id": 78, "ts": 20}\n')
    assert read_log(jl)["user_id"].tolist() == ["5", "x"]


def test_iso_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "iso.csv"
    path.write_text(
        "user_id,item_id,ts\n"
        "u,a,2024-01-01T00:00:01Z\n"
        "u,b,2024-01-01T00:00:00.500+00:00\n"
        "u,c,2024-01-01T01:00:00\n"  # naive = UTC, as in the worker
    )
    df = read_log(path)
    base = 1704067200000
    assert df["ts"].tolist() == [base + 500, base + 1000, base + 3_600_000]
    assert df["item_id"].tolist() == ["b", "a", "c"]


def test_sniffs_tab_separated_txt(tmp_path: Path) -> None:
    path = tmp_path / "clicks.txt"
    path.write_text("SessionId\tItemId\tTime\n1\t9\t1.25\n")
    df = read_log(path, parse_columns("user=SessionId,item=ItemId,ts=Time"), ts_unit="s")
    assert df.iloc[0].tolist() == ["1", "9", 1250, "click", ""]


def test_bad_logs_are_refused_with_the_file_and_the_reason(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.csv: event log not found"):
        read_log(tmp_path / "nope.csv")
    odd = tmp_path / "log.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"log.xlsx: unknown log format"):
        read_log(odd)
    p = tmp_path / "cols.csv"
    p.write_text("user,item,time\nu,a,1\n")
    with pytest.raises(DataError, match=r"cols.csv: missing column 'user_id'.*available columns: user, item, time"):
        read_log(p)
    with pytest.raises(DataError, match=r"missing column 'kind' \(for event_type\)"):
        read_log(p, {"user": "user", "item": "item", "ts": "time", "event_type": "kind"})
    p.write_text("user_id,item_id,ts\nu,a,1\nu,b,yesterday\nu,c,nan-ish\n")
    with pytest.raises(DataError, match=r"cols.csv: unparseable ts in 2 rows \(e.g. 'yesterday'"):
        read_log(p)
    p.write_text("user_id,item_id,ts\n")
    with pytest.raises(DataError, match="cols.csv: empty log"):
        read_log(p)
    p.write_text("")
    with pytest.raises(DataError, match="cols.csv: empty log"):
        read_log(p)
    p.write_text("user_id,item_id,ts\nu,a,1\n,b,2\nu,,\nv,c,4\n")
    with pytest.raises(DataError, match=r"2 rows with a missing user_id/item_id/ts.*first at data row 2"):
        read_log(p)
    with pytest.raises(ConfigError, match="ts_unit"):
        read_log(p, ts_unit="us")
    p.write_text('user_id,item_id,ts\nu,"a,1\n')  # pandas' own parse error
    with pytest.raises(DataError, match="cols.csv: unreadable log"):
        read_log(p)
    gz = tmp_path / "bad.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"user_id": "u", "item_id": "a"}\n')
    with pytest.raises(DataError, match=r"missing column 'ts'"):
        read_log(gz)


def test_temporal_split_boundaries() -> None:
    df = pd.DataFrame({"user_id": ["u"] * 6, "item_id": list("abcdef"), "ts": [0, 10, 79, 80, 81, 100]})
    train, test = temporal_split(df, test_frac=0.2)  # cut = 0 + 0.8 * 100 = 80
    assert train["ts"].tolist() == [0, 10, 79]
    assert test["ts"].tolist() == [80, 81, 100]
    assert test.index.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError):
        temporal_split(df, test_frac=1.0)


def test_session_ids_hand_checked() -> None:
    df = pd.DataFrame(
        {
            "user_id": ["a", "b", "a", "a", "b", "a", "b"],
            "item_id": list("xxxxxxx"),
            "ts": [0, 5, 10, 25, 30, 35, 100],
        }
    )
    # gap 10: a: 0,10 (gap 10, same), 25 (gap 15, new), 35 (gap 10, same); b: 5, 30 (new), 100 (new)
    assert session_ids(df, gap_ms=10).tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert session_ids(df.iloc[:0], gap_ms=10).tolist() == []


def test_dataset_stats() -> None:
    df = pd.DataFrame(
        {"user_id": ["a", "a", "a", "b", "b"], "item_id": ["x", "y", "x", "x", "x"], "ts": [0, 1, 100, 2, 3]}
    )
    s = dataset_stats(df.sort_values("ts", kind="stable", ignore_index=True), gap_ms=50)
    assert (s["users"], s["items"], s["events"], s["sessions"]) == (2, 2, 5, 3)
    assert s["mean_session_length"] == pytest.approx(5 / 3)
    assert s["repeat_fraction"] == pytest.approx(2 / 5)  # a's 2nd x, b's 2nd x
