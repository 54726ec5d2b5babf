"""Event logs on disk -> one canonical, time-sorted DataFrame (SPEC sections 2 and 9).

Every offline command (synth, item-embeddings, train, evaluate, embed, replay) reads logs through
`read_log`, so a dataset's layout is mapped once (`--columns`, `--ts-unit`) and everything after it
sees the same columns: `user_id` (str), `item_id` (str), `ts` (int64 epoch ms), `event_type` (str),
`event_id` (str, '' when absent), and `category` (str, '' when missing) only when the log maps one
or has a column named `category` or `category_id` (`--columns ...,category=` reads none): an item
attribute that goes into the item table, not into the events a worker reads.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from livemb.core.errors import ConfigError, DataError
from livemb.core.extras import require

log = logging.getLogger(__name__)

CANONICAL = {
    "user": "user_id",
    "item": "item_id",
    "ts": "ts",
    "event_type": "event_type",
    "event_id": "event_id",
    "category": "category",  # an item attribute (docs/MODELS.md "Item categories"); events never carry it live
}
REQUIRED = ("user", "item", "ts")
OPTIONAL = ("event_type", "event_id", "category")
# Column names an optional field is read from when --columns does not map it (the first present);
# `category=` (empty) in --columns reads none. taobao-dev names it category_id.
DEFAULT_NAMES = {"event_type": ("event_type",), "event_id": ("event_id",), "category": ("category", "category_id")}
# Aliases accepted by parse_columns, so `user_id=...` works as well as `user=...`.
_KEY_ALIASES = {"user_id": "user", "item_id": "item", "time": "ts", "timestamp": "ts"}
_SEP_CANDIDATES = ("\t", ",", ";", "|")
_NO_DATES = {} if int(pd.__version__.split(".")[0]) >= 3 else {"convert_dates": False}


def parse_columns(spec: str) -> dict[str, str]:
    """`"user=SessionId,item=ItemId,ts=Time"` -> {"user": "SessionId", ...} (the CLI's --columns)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, src = part.partition("=")
        key, src = key.strip(), src.strip()
        key = _KEY_ALIASES.get(key, key)
        if not eq or (not src and key != "category"):  # category= : read no category column
            raise ConfigError(f"--columns: expected NAME=SOURCE, got {part!r}")
        if key not in CANONICAL:
            raise ConfigError(f"--columns: unknown name {key!r} (known: {', '.join(CANONICAL)})")
        if key in out:
            raise ConfigError(f"--columns: {key!r} given twice")
        out[key] = src
    return out


def _format_of(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    # .inter: RecBole atomic files (tab-separated, typed headers such as user_id:token)
    kinds = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".inter": "csv", ".parquet": "parquet", ".jsonl": "jsonl",
             ".json": "jsonl"}
    if ext not in kinds or (gz and kinds[ext] == "parquet"):
        raise DataError(
            f"{path}: unknown log format {''.join(path.suffixes) or '(no suffix)'!r}; "
            "use .csv/.tsv/.txt/.inter/.parquet/.jsonl/.json (.gz allowed for text formats)"
        )
    return kinds[ext], gz


def _sniff_sep(path: Path, gz: bool) -> str:
    """Pick the delimiter that occurs most often in the header line (yoochoose .txt is tabs)."""
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        header = f.readline()
    counts = {c: header.count(c) for c in _SEP_CANDIDATES}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] > 0 else ","


def _open_source(path: Path, kind: str, gz: bool, sep: str | None):
    """-> (available column names, reader(cols) -> DataFrame). Only mapped columns are read, and
    CSV is read as text so ids like '0123' survive."""
    if kind == "csv":
        sep = sep or _sniff_sep(path, gz)
        try:
            header = pd.read_csv(path, sep=sep, nrows=0).columns
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty log (no header, no events)") from None
        return [str(c) for c in header], lambda cols: pd.read_csv(path, sep=sep, dtype=str, usecols=cols)
    if kind == "parquet":
        pq = require("pyarrow.parquet", f"{path}: reading Parquet")
        return list(pq.read_schema(path).names), lambda cols: pd.read_parquet(path, columns=cols)
    # JSONL (a .json file holding one JSON array is accepted too): the whole file is parsed once.
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = f.read(1024).lstrip()
    if not first:
        raise DataError(f"{path}: empty log (no events)")
    try:
        # dtype=False keeps ints as ints and strings as strings; no guessing of date columns
        # (pandas < 3 also needs convert_dates=False for that, pandas 3 deprecates it).
        df = pd.read_json(path, lines=not first.startswith("["), dtype=False, **_NO_DATES)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON lines ({e})") from None
    return [str(c) for c in df.columns], lambda cols: df[cols]


def _check_columns(path: Path, wanted: dict[str, str], available: list[str]) -> None:
    missing = [f"{src!r} (for {key})" for key, src in wanted.items() if src not in available]
    if missing:
        raise DataError(
            f"{path}: missing column {', '.join(missing)}; available columns: {', '.join(map(str, available))}"
            " (map them with --columns user=..,item=..,ts=..)"
        )


def _ids_to_str(s: pd.Series) -> pd.Series:
    """Integer-looking numeric ids -> '123' (not '123.0'); everything else -> its text."""
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64)
        if np.all(v == np.round(v)):
            return pd.Series(v.astype(np.int64), index=s.index).astype(str)
    return s.astype(str)


def _ts_to_ms(s: pd.Series, ts_unit: str, path: Path) -> np.ndarray:
    """Numbers (s or ms, float allowed), numeric strings or ISO-8601 strings -> int64 epoch ms."""
    scale = 1000.0 if ts_unit == "s" else 1.0
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        dt = pd.to_datetime(s, utc=True)
        return ((dt - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy(np.int64)
    if pd.api.types.is_integer_dtype(s.dtype) and scale == 1.0:
        return s.to_numpy(np.int64)  # exact, no float round trip
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        num = s.astype(np.float64)
        iso_ms = pd.Series(np.nan, index=s.index)
    else:
        # Text: numbers where they parse, ISO-8601 elsewhere (naive times are UTC, as in the worker).
        num = pd.to_numeric(s, errors="coerce")
        rest = num.isna()
        iso_ms = pd.Series(np.nan, index=s.index)
        if rest.any():
            dt = pd.to_datetime(s[rest], utc=True, errors="coerce", format="ISO8601")
            iso_ms[rest] = (dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(milliseconds=1)
    ms = np.where(num.notna(), num.to_numpy(np.float64, na_value=np.nan) * scale, iso_ms.to_numpy(np.float64))
    bad = ~np.isfinite(ms)
    if bad.any():
        examples = ", ".join(repr(v) for v in s[bad].head(3).tolist())
        raise DataError(
            f"{path}: unparseable ts in {int(bad.sum())} rows (e.g. {examples}); "
            "expected epoch numbers (--ts-unit s|ms) or ISO-8601 strings"
        )
    out = np.round(ms).astype(np.int64)
    if ts_unit == "ms" and num.notna().all() and np.median(out) < 1e11:
        # Epoch seconds read as ms land in 1970; usually a forgotten --ts-unit s.
        log.warning("%s: ts values look like epoch seconds; pass --ts-unit s if so", path)
    return out


def read_log(
    path: str | Path,
    columns: dict[str, str] | None = None,
    ts_unit: str = "ms",
    sep: str | None = None,
) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet/JSONL event log into the canonical, ts-sorted (stable) frame."""
    path = Path(path)
    if ts_unit not in ("s", "ms"):
        raise ConfigError(f"ts_unit must be 's' or 'ms', got {ts_unit!r}")
    columns = dict(columns or {})
    unknown = set(columns) - set(CANONICAL)
    if unknown:
        raise ConfigError(f"unknown column mapping key(s) {sorted(unknown)}; known: {', '.join(CANONICAL)}")
    if not path.is_file():
        raise DataError(f"{path}: event log not found")
    kind, gz = _format_of(path)

    # Optional columns are read when mapped explicitly (then they must exist) or present by default name.
    wanted = {k: columns.get(k, CANONICAL[k]) for k in REQUIRED}
    optional = {k: columns[k] for k in OPTIONAL if columns.get(k)}
    try:
        available, reader = _open_source(path, kind, gz, sep)
        for k in OPTIONAL:
            if k not in columns:
                found = [name for name in DEFAULT_NAMES[k] if name in available]
                if found:
                    optional[k] = found[0]
        _check_columns(path, {**wanted, **optional}, available)
        raw = reader(list(dict.fromkeys({**wanted, **optional}.values())))
    except DataError:
        raise
    except ValueError as e:  # a pandas / pyarrow parse error: the file is bad, not the code
        raise DataError(f"{path}: unreadable log ({e})") from None
    if len(raw) == 0:
        raise DataError(f"{path}: empty log (header but no events)")

    # Nulls in required fields are a data problem to fix upstream, not to hide: fail with the count.
    src = {k: raw[v] for k, v in {**wanted, **optional}.items()}
    null = np.zeros(len(raw), dtype=bool)
    parts = []
    for k in REQUIRED:
        col = src[k]
        m = col.isna().to_numpy().copy()
        if k != "ts":
            m |= (col.astype(str).str.strip() == "").to_numpy()
        if m.any():
            parts.append(f"{CANONICAL[k]}: {int(m.sum())}")
        null |= m
    if null.any():
        first = int(np.flatnonzero(null)[0])
        raise DataError(
            f"{path}: {int(null.sum())} rows with a missing user_id/item_id/ts ({', '.join(parts)}; "
            f"first at data row {first + 1}); clean or drop them before use"
        )

    n = len(raw)
    out = pd.DataFrame(
        {
            "user_id": _ids_to_str(src["user"]).to_numpy(),
            "item_id": _ids_to_str(src["item"]).to_numpy(),
            "ts": _ts_to_ms(src["ts"], ts_unit, path),
            "event_type": (src["event_type"].fillna("click").astype(str).to_numpy()
                           if "event_type" in src else np.full(n, "click", dtype=object)),
            "event_id": (_ids_to_str(src["event_id"].dropna()).reindex(raw.index).fillna("").to_numpy()
                         if "event_id" in src else np.full(n, "", dtype=object)),
        }
    )
    out["event_type"] = out["event_type"].mask(out["event_type"] == "", "click")
    if "category" in src:  # only when the log has one: "" for a missing value
        out["category"] = _ids_to_str(src["category"].dropna()).reindex(raw.index).fillna("").to_numpy()
    out = out.sort_values("ts", kind="stable", ignore_index=True)
    log.info("%s: %d events, %d users, %d items", path, n, out["user_id"].nunique(), out["item_id"].nunique())
    return out


def load_log(path: str | Path, columns: str | None = None, ts_unit: str = "ms") -> pd.DataFrame:
    """`read_log` with the command-line spelling of the mapping (`--columns`, `--ts-unit`)."""
    return read_log(path, columns=parse_columns(columns) if columns else None, ts_unit=ts_unit)


def temporal_split(df: pd.DataFrame, test_frac: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Global time cut (SPEC section 4): events with ts >= ts_min + (1-test_frac)*range are test."""
    if not 0.0 < test_frac < 1.0:
        raise ConfigError(f"test_frac must be in (0, 1), got {test_frac}")
    if len(df) == 0:
        raise DataError("temporal_split: empty log")
    ts = df["ts"].to_numpy()
    lo, hi = int(ts.min()), int(ts.max())
    cut = lo + (1.0 - test_frac) * (hi - lo)
    is_test = ts >= cut
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def session_ids(df: pd.DataFrame, gap_ms: float) -> np.ndarray:
    """Per-row session number within its user (0, 1, ...); a gap > gap_ms starts a new one.

    Assumes `df` is sorted by ts (as read_log returns it).
    """
    if len(df) == 0:
        return np.zeros(0, dtype=np.int64)
    gaps = df["ts"].groupby(df["user_id"], sort=False).diff()
    new = (gaps > gap_ms).astype(np.int64)  # NaN (first event of a user) compares False
    return new.groupby(df["user_id"], sort=False).cumsum().to_numpy(np.int64)


def dataset_stats(df: pd.DataFrame, gap_ms: float) -> dict:
    """Sizes and shape of a log, for the evaluate JSON's "dataset" block."""
    n = len(df)
    if n == 0:
        return {"users": 0, "items": 0, "events": 0, "sessions": 0, "mean_session_length": 0.0,
                "repeat_fraction": 0.0}
    users = int(df["user_id"].nunique())
    sess = session_ids(df, gap_ms)
    # sessions = users + number of breaks (a break is where the session number increases).
    breaks = int((df.assign(_s=sess).groupby("user_id", sort=False)["_s"].max()).sum())
    sessions = users + breaks
    # Sorted by ts, so a duplicated (user, item) pair is one the user touched before.
    repeats = df.duplicated(["user_id", "item_id"], keep="first").to_numpy()
    ts = df["ts"].to_numpy()
    return {
        "users": users,
        "items": int(df["item_id"].nunique()),
        "events": n,
        "sessions": sessions,
        "mean_session_length": n / sessions,
        "repeat_fraction": float(repeats.mean()),
        "ts_min": int(ts.min()),
        "ts_max": int(ts.max()),
        "days": float((ts.max() - ts.min()) / 86_400_000),
    }


def repeat_profile(df: pd.DataFrame, gap_ms: float, test_frac: float = 0.2) -> dict:
    """The repeat structure of a log: share of events that re-touch an item of
    the same user, the distance back (in the user's events) to the previous touch, how many cross
    a session break, event-type shares, sessions per user and session length (medians), and the
    share of test events (global temporal split) whose item never occurs in the train part."""
    if len(df) == 0:
        return {}
    d = df.reset_index(drop=True)
    pos = d.groupby("user_id", sort=False).cumcount().to_numpy()
    sess = session_ids(d, gap_ms)
    prev_pos = d.assign(_p=pos).groupby(["user_id", "item_id"], sort=False)["_p"].shift(1).to_numpy()
    prev_sess = d.assign(_s=sess).groupby(["user_id", "item_id"], sort=False)["_s"].shift(1).to_numpy()
    rep = ~np.isnan(prev_pos)
    dist = pos[rep] - prev_pos[rep]
    sessions = d.assign(_s=sess).groupby("user_id", sort=False)["_s"].max() + 1
    lengths = d.assign(_s=sess).groupby(["user_id", "_s"], sort=False).size()
    train, test = temporal_split(d, test_frac)
    out = {
        "events": int(len(d)),
        "repeat_share": float(rep.mean()),
        "repeat_within": {k: float((dist <= k).mean()) if len(dist) else 0.0 for k in (5, 10, 16, 20, 50, 64, 96)},
        "repeat_cross_session": float((sess[rep] != prev_sess[rep]).mean()) if rep.any() else 0.0,
        "event_types": {str(k): float(v) for k, v in d["event_type"].value_counts(normalize=True).items()},
        "sessions_per_user_median": float(sessions.median()),
        "session_length_median": float(lengths.median()),
        "max_user_events": int(d.groupby("user_id", sort=False).size().max()),
        "test_unseen_item_share": float((~test["item_id"].isin(set(train["item_id"]))).mean()) if len(test) else 0.0,
    }
    return out
