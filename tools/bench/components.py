"""Offline components of `livemb bench`: retrieval, the model step and state size, without a broker.

Each `bench_*` function returns a list of dict rows (one per measured configuration) and logs its
progress; `python -m livemb.tools.bench.components [--quick] [--json OUT]` runs them all and prints tables.

- `structured_item_vectors`: a catalogue with structure (Zipf-sized topics on a low-rank,
  anisotropic spectrum, sub-topics, unit norm, like the project's PPMI-SVD vectors) and queries
  drawn like user embeddings (popularity-weighted mixtures of a few items plus noise). ANN recall
  on iid Gaussian vectors says little about real catalogues (no neighbourhoods to exploit).
- `bench_retrieval`: per (size, kind) build time, index bytes, load time of the saved index
  (memory-mapped, as the worker loads `--index-path`), queries/s at batch 1 and 512, recall@k vs
  exact; plus a sweep of the search-time parameter (efSearch / nprobe) that chose the defaults.
- `bench_model`: user-steps/s through `SeqModel.step` at batch 1 vs 512, and the per-event cost
  after 10 vs 10,000 prior events (the state is fixed-size: measured, not assumed).
- `bench_state`: bytes of one stored row and RocksDB bytes per 100k users (real records, Faust's
  own RocksDB options, one DB per partition as the worker's table keeps them).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import orjson
import torch

from livemb.core.errors import ConfigError
from livemb.core.items import ItemTable
from livemb.core.progress import progress
from livemb.models.base import EventBatch, SeqModel
from livemb.models.checkpoint import load_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.retrieval import build_index, index_params, load_index, recall_at_k, save_index, set_search_params
from livemb.state.guard import GuardState, event_hash, wrap
from livemb.state.record import encode

log = logging.getLogger("livemb.bench")

SWEEP = {"hnsw": ("efSearch", (32, 64, 128, 256)), "ivfpq": ("nprobe", (8, 16, 32, 64, 128))}


# ---------------------------------------------------------------------------- data
def structured_item_vectors(n_items: int, dim: int = 64, seed: int = 0, n_queries: int = 1024,
                            topics: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (item vectors (n_items, dim) float32, unit norm; queries (n_queries, dim) float32).

    Items: topic centroid (Zipf topic sizes, centroids on a decaying spectrum of `dim` directions)
    + sub-topic offset + item noise, normalised. Queries: a user's 1-4 clicked items, drawn by a
    Zipf item popularity mostly from one or two topics, mixed with Dirichlet weights + noise.
    Not tools/data/synth.py's item space: it plants at most dim/3 orthogonal topic rings (at 1M items,
    50k items per ring and one scale of structure), which is a test of models, not of an ANN index."""
    if n_items < 1 or dim < 2:
        raise ConfigError("structured_item_vectors: n_items >= 1 and dim >= 2")
    rng = np.random.default_rng(seed)
    T = topics or max(8, int(np.sqrt(n_items) / 2))
    spectrum = (1.0 + np.arange(dim)) ** -0.5  # anisotropic, like an SVD embedding's singular values
    spectrum /= np.linalg.norm(spectrum)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    scale = spectrum * np.sqrt(dim)

    def draw(n: int, s: float) -> np.ndarray:
        return (rng.normal(size=(n, dim)).astype(np.float32) * (s * scale).astype(np.float32)) @ basis.T.astype(np.float32)

    topic_p = 1.0 / (1.0 + np.arange(T)) ** 0.8
    topic_p /= topic_p.sum()
    item_topic = rng.choice(T, size=n_items, p=topic_p)
    subs = 8
    item_sub = item_topic * subs + rng.integers(0, subs, size=n_items)
    centroids = draw(T, 1.0)
    sub_off = draw(T * subs, 0.45)
    x = centroids[item_topic] + sub_off[item_sub] + draw(n_items, 0.35)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    # queries: popularity (Zipf over a random item order); 1-4 items, the later ones from the same
    # topic as the first with prob 0.7 (a taste), else anywhere
    pop = np.empty(n_items)
    pop[rng.permutation(n_items)] = 1.0 / (1.0 + np.arange(n_items)) ** 1.0
    pop /= pop.sum()
    first = rng.choice(n_items, size=n_queries, p=pop)
    picks = rng.choice(n_items, size=(n_queries, 4), p=pop)
    order = np.argsort(item_topic, kind="stable")
    starts = np.searchsorted(item_topic[order], np.arange(T))
    sizes = np.bincount(item_topic, minlength=T)
    same = order[starts[item_topic[first]][:, None] + (rng.random((n_queries, 4)) * sizes[item_topic[first]][:, None]).astype(np.int64)]
    picks = np.where(rng.random((n_queries, 4)) < 0.7, same, picks)
    picks[:, 0] = first
    n_used = rng.integers(1, 5, size=n_queries)
    w = rng.gamma(1.0, size=(n_queries, 4)) * (np.arange(4)[None, :] < n_used[:, None])
    w /= w.sum(axis=1, keepdims=True)
    q = np.einsum("qk,qkd->qd", w, x[picks]) + rng.normal(size=(n_queries, dim)) * (0.1 / np.sqrt(dim))
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(q, np.float32)


# ---------------------------------------------------------------------------- helpers
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _search_all(index: faiss.Index, q: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
    """ids (n, k) and queries/s for `q` searched in blocks of `batch`."""
    ids = np.empty((len(q), k), np.int64)
    t0 = time.perf_counter()
    for i in range(0, len(q), batch):
        ids[i : i + batch] = index.search(q[i : i + batch], k)[1]
    return ids, len(q) / (time.perf_counter() - t0)


def _qps_batch1(index: faiss.Index, q: np.ndarray, k: int, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while n < len(q) and (n < 20 or time.perf_counter() - t0 < seconds):
        index.search(q[n : n + 1], k)
        n += 1
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------- retrieval
def bench_retrieval(sizes: Sequence[int] = (50_000, 1_000_000), kinds: Sequence[str] = ("flat", "hnsw", "ivfpq"), *,
                    dim: int = 64, n_queries: int = 1024, k: int = 20, batch: int = 512, threads: int = 1,
                    seed: int = 0, params: dict[str, dict] | None = None, batch1_seconds: float = 3.0,
                    sweep: bool = True, workdir: str | None = None,
                    configs: Sequence[tuple[str, dict]] | None = None, serve_k: int | None = 84) -> list[dict]:
    """Rows per (size, kind): build_s, index_bytes (the saved file), rss_delta_bytes (build),
    load_s (mmap load of the saved file, the `--index-path` path), qps_batch1, qps_batch<batch>,
    recall@k vs exact; with `sweep`, extra rows (sweep=<param>) over the search-time parameter.
    `params`: kind -> overrides of the tuned defaults; `configs`: explicit (kind, overrides) pairs
    instead of `kinds` (the tuning grid). `serve_k`: also queries/s at batch `batch` for the k the
    worker searches (topk + recent_items: 20 + 64 by default)."""
    configs = list(configs) if configs is not None else [(kind, (params or {}).get(kind)) for kind in kinds]
    rows: list[dict] = []
    with faiss_threads(threads), tempfile.TemporaryDirectory(dir=workdir, prefix="livemb-bench-") as tmp:
        for n in sizes:
            log.info("retrieval: %d structured items x %d, %d queries", n, dim, n_queries)
            x, q = structured_item_vectors(n, dim, seed, n_queries)
            padded = np.concatenate([np.zeros((1, dim), np.float32), x])
            del x
            exact, _ = _search_all(build_index(padded, "flat"), q, k, batch)
            for kind, overrides in configs:
                p = index_params(kind, n, dim, overrides)
                log.info("retrieval: %d items, building %s %s", n, kind, p)
                rss0, t0 = rss_bytes(), time.perf_counter()
                built = build_index(padded, kind, seed, params=p, progress=True)
                build_s, rss_delta = time.perf_counter() - t0, rss_bytes() - rss0
                path = Path(tmp) / f"{kind}-{n}.faiss"
                save_index(built, path, items_fingerprint="bench", kind=kind, params=p, build_seconds=build_s)
                del built
                t0 = time.perf_counter()
                index = load_index(path, items_fingerprint="bench", kind=kind, n_items=n, dim=dim)
                load_s = time.perf_counter() - t0
                index.search(q[:batch], k)  # warm-up: fault the mapped pages in
                ids, qps_b = _search_all(index, q, k, batch)
                row = {"bench": "retrieval", "items": n, "dim": dim, "kind": kind, "params": p, "threads": threads,
                       "build_s": round(build_s, 2), "index_bytes": path.stat().st_size,
                       "rss_delta_bytes": rss_delta, "load_s": round(load_s, 3),
                       "qps_batch1": round(_qps_batch1(index, q, k, batch1_seconds), 1),
                       f"qps_batch{batch}": round(qps_b, 1), f"recall@{k}": round(recall_at_k(ids, exact), 4)}
                if serve_k:
                    row[f"qps_batch{batch}_k{serve_k}"] = round(_search_all(index, q, serve_k, batch)[1], 1)
                rows.append(row)
                log.info("retrieval: %s", _fmt(row))
                if sweep and kind in SWEEP:
                    name, values = SWEEP[kind]
                    for v in values:
                        set_search_params(index, kind, {**p, name: v})
                        ids, qps_b = _search_all(index, q, k, batch)
                        rows.append({"bench": "retrieval_sweep", "items": n, "kind": kind, "params": p, "sweep": name, "value": v,
                                     "threads": threads, f"qps_batch{batch}": round(qps_b, 1),
                                     f"recall@{k}": round(recall_at_k(ids, exact), 4)})
                    log.info("retrieval: %s sweep %s", kind, [(r["value"], r[f"recall@{k}"]) for r in rows[-len(values):]])
                del index
                path.unlink()
    return rows


TUNE_GRID: tuple[tuple[str, dict], ...] = (
    ("hnsw", {"M": 16, "efConstruction": 80}), ("hnsw", {"M": 32, "efConstruction": 40}),
    ("hnsw", {"M": 32, "efConstruction": 80}), ("hnsw", {"M": 32, "efConstruction": 160}),
    ("hnsw", {"M": 48, "efConstruction": 80}),
    ("ivfpq", {"m": 16, "refine": 0}), ("ivfpq", {"m": 32, "refine": 0}), ("ivfpq", {"m": 16, "refine": 16}),
    ("ivfpq", {"m": 16, "refine": 32}), ("ivfpq", {"m": 32, "refine": 8}),
)


def tune_retrieval(sizes: Sequence[int] = (1_000_000,), grid: Sequence[tuple[str, dict]] = TUNE_GRID, **kw) -> list[dict]:
    """The grid that chose `build_index`'s defaults: build-time parameters x a search-time sweep."""
    return bench_retrieval(sizes, configs=grid, **kw)


# ---------------------------------------------------------------------------- model
def _model(checkpoint: str | None, items: str | None, dim: int, hidden: int, n_items: int, seed: int) -> SeqModel:
    if checkpoint:
        if not items:
            raise ConfigError("bench_model: a checkpoint needs its items file")
        table = ItemTable.load(items)
        return load_checkpoint(checkpoint, table.padded_vectors(), table.fingerprint,
                               categories=table.category_codes()).eval()
    torch.manual_seed(seed)
    x, _ = structured_item_vectors(n_items, dim, seed, 1)
    return build_model("hiertcn", np.concatenate([np.zeros((1, dim), np.float32), x]), hidden=hidden).eval()


def _events(B: int, T: int, n_items: int, t0: np.ndarray, rng: np.random.Generator, session_len: int = 10) -> EventBatch:
    """B users x T events: sessions of `session_len` clicks 60 s apart, 2 h between sessions."""
    steps = np.where(np.arange(1, T + 1) % session_len == 0, 7_200_000, 60_000)
    ts = t0[:, None] + np.cumsum(steps)[None, :]
    item = rng.integers(1, n_items + 1, size=(B, T))
    return EventBatch(torch.from_numpy(item), torch.zeros(B, T, dtype=torch.int64), torch.from_numpy(ts),
                      torch.ones(B, T, dtype=torch.bool))


def _time_steps(model: SeqModel, st: dict, ev: EventBatch, seconds: float, min_reps: int = 5) -> tuple[float, int]:
    """Seconds per `model.step(st, ev)` (always from the same state), after 2 warm-up steps."""
    with torch.no_grad():
        for _ in range(2):
            model.step(st, ev)
        reps, t0 = 0, time.perf_counter()
        while reps < min_reps or time.perf_counter() - t0 < seconds:
            model.step(st, ev)
            reps += 1
    return (time.perf_counter() - t0) / reps, reps


def _row_bytes(model: SeqModel, st: dict, b: int = 0) -> int:
    """One user's stored row: the model state record in the guard envelope (16 event ids)."""
    record = encode({k: v[b].cpu().numpy() for k, v in st.items()}, {"items": 1})
    g = GuardState(size=16, partition=0, offset=1, last_ts=int(st["last_ts"][b]), applied=1)
    g.ring[:] = np.arange(1, 17)
    return len(wrap(g, record))


def bench_model(checkpoint: str | None = None, items: str | None = None, *, dim: int = 64, hidden: int = 128,
                n_items: int = 50_000, batches: Sequence[int] = (1, 512), histories: Sequence[int] = (10, 10_000),
                history_batch: int = 64, seconds: float = 2.0, threads: int = 1, seed: int = 0) -> list[dict]:
    """User-steps/s per batch size (one event per user per step), and the per-event cost of one
    more event for `history_batch` users warmed on each history length (torch with `threads`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(checkpoint, items, dim, hidden, n_items, seed)
        N, rng, rows = model.n_items, np.random.default_rng(seed), []
        name = model.cfg.name
        for B in batches:
            st = model.init_state(B)
            with torch.no_grad():  # users in an open session, as in a live batch
                st, _ = model.step(st, _events(B, 3, N, np.full(B, 1_700_000_000_000), rng))
            per_step, reps = _time_steps(model, st, _events(B, 1, N, st["last_ts"].numpy(), rng), seconds)
            rows.append({"bench": "model_batch", "model": name, "dim": model.cfg.dim, "hidden": model.cfg.hidden,
                         "threads": threads, "batch": B, "ms_per_step": round(per_step * 1e3, 3),
                         "user_steps_per_s": round(B / per_step, 1), "reps": reps})
            log.info("model: %s", _fmt(rows[-1]))
        for H in histories:
            B = history_batch
            st = model.init_state(B)
            chunk = 1000  # steps per model.step call while warming up
            with torch.no_grad(), progress(total=H, desc=f"model: warm {B} users on {H} events", unit="events") as bar:
                t0 = np.full(B, 1_700_000_000_000)
                for i in range(0, H, chunk):
                    n = min(chunk, H - i)
                    st, _ = model.step(st, _events(B, n, N, t0, rng))
                    t0 = st["last_ts"].numpy()
                    bar.update(n)
            per_step, reps = _time_steps(model, st, _events(B, 1, N, st["last_ts"].numpy(), rng), seconds)
            rows.append({"bench": "model_history", "model": name, "threads": threads, "history": H, "batch": B,
                         "us_per_event": round(per_step / B * 1e6, 2), "ms_per_step": round(per_step * 1e3, 3),
                         "n_events_state": int(st["n_events"][0]), "sessions_state": int(st["session"][0]),
                         "row_bytes": _row_bytes(model, st), "reps": reps})
            log.info("model: %s", _fmt(rows[-1]))
        return rows
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- state
def bench_state(n_users: int = 100_000, *, dim: int = 64, hidden: int = 128, events_per_user: int = 30,
                partitions: int = 4, chunk: int = 4096, n_items: int = 50_000, checkpoint: str | None = None,
                items: str | None = None, seed: int = 0, workdir: str | None = None) -> list[dict]:
    """Real rows (each user stepped through `events_per_user` events, record + guard envelope with
    the user's event-id hashes) written with Faust's RocksDB options into `partitions` DBs, flushed
    and compacted: bytes per row and directory bytes per 100k users."""
    from faust.stores.rocksdb import RocksDBOptions

    model = _model(checkpoint, items, dim, hidden, n_items, seed)
    rng = np.random.default_rng(seed)
    row_bytes = record_bytes = 0
    with tempfile.TemporaryDirectory(dir=workdir, prefix="livemb-state-") as tmp:
        dbs = [RocksDBOptions().open(Path(tmp) / f"livemb-state-{p}.db") for p in range(partitions)]
        with progress(total=n_users, desc="state: users written", unit="users") as bar:
            for lo in range(0, n_users, chunk):
                B = min(chunk, n_users - lo)
                with torch.no_grad():
                    st, _ = model.step(model.init_state(B), _events(B, events_per_user, model.n_items,
                                                                    np.full(B, 1_700_000_000_000), rng))
                host = {k: v.numpy() for k, v in st.items()}
                for b in range(B):  # one record per user, as stream/processor.py writes them
                    uid = f"user-{lo + b:08d}"
                    record = encode({k: v[b] for k, v in host.items()}, {"items": 123_456_789})
                    g = GuardState(size=16, partition=lo % partitions, offset=(lo + b) * events_per_user,
                                   last_ts=int(host["last_ts"][b]), applied=events_per_user)
                    for e in range(events_per_user - 16, events_per_user):
                        g.remember(event_hash(f"{uid}:{e}"))
                    row = wrap(g, record)
                    key = uid.encode()
                    dbs[zlib.crc32(key) % partitions].put(key, row)
                    row_bytes += len(row)
                    record_bytes += len(record)
                bar.update(B)
        for db in dbs:
            db.flush()
            db.compact_range(None, None)
            db.close()
        files = [f for f in Path(tmp).rglob("*") if f.is_file()]
        total = sum(f.stat().st_size for f in files)
        sst = sum(f.stat().st_size for f in files if f.suffix == ".sst")
    row = {"bench": "state", "model": model.cfg.name, "dim": model.cfg.dim, "hidden": model.cfg.hidden,
           "recent_items": model.cfg.recent_items, "users": n_users, "partitions": partitions,
           "record_bytes_per_user": round(record_bytes / n_users, 1), "row_bytes_per_user": round(row_bytes / n_users, 1),
           "rocksdb_bytes": total, "rocksdb_sst_bytes": sst,
           "rocksdb_bytes_per_100k_users": round(total * 100_000 / n_users)}
    log.info("state: %s", _fmt(row))
    return [row]


# ---------------------------------------------------------------------------- CLI
def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items() if k != "bench")


def print_table(rows: list[dict]) -> None:
    for bench in dict.fromkeys(r["bench"] for r in rows):
        part = [r for r in rows if r["bench"] == bench]
        cols = [c for c in dict.fromkeys(c for r in part for c in r) if c != "bench"]
        cells = [[str(r.get(c, "")) for c in cols] for r in part]
        widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
        print(f"\n## {bench}")
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for x in cells:
            print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))


def run_all(quick: bool = False, *, threads: int = 1, checkpoint: str | None = None, items: str | None = None,
            sizes: Sequence[int] | None = None, kinds: Sequence[str] = ("flat", "hnsw", "ivfpq")) -> list[dict]:
    """Everything the offline bench measures; `quick`: CI-smoke sizes (about a minute on 2 cores)."""
    sizes = sizes or ((20_000,) if quick else (50_000, 1_000_000))
    rows = bench_retrieval(sizes, kinds, threads=threads, n_queries=512 if quick else 1024,
                           batch1_seconds=0.5 if quick else 3.0)
    rows += bench_model(checkpoint, items, threads=threads, n_items=20_000 if quick else 50_000,
                        histories=(10, 1_000) if quick else (10, 10_000), seconds=0.3 if quick else 2.0)
    rows += bench_state(10_000 if quick else 100_000, checkpoint=checkpoint, items=items,
                        n_items=20_000 if quick else 50_000)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m livemb.tools.bench.components", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke sizes (20k items, 10k users)")
    ap.add_argument("--tune", action="store_true", help="only the retrieval tuning grid (TUNE_GRID) at --sizes (default 1M)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--sizes", help="comma-separated catalogue sizes (default 50000,1000000; quick 20000)")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--threads", type=int, default=1, help="faiss and torch threads (the worker runs torch on 1)")
    ap.add_argument("--model", help="checkpoint to measure instead of an untrained HierTCN D=64 H=128")
    ap.add_argument("--items", help="items.npz of --model")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        if args.tune:
            rows = tune_retrieval(sizes or (1_000_000,), threads=args.threads, batch1_seconds=1.0)
        else:
            rows = run_all(args.quick, threads=args.threads, checkpoint=args.model, items=args.items, sizes=sizes,
                           kinds=args.kinds.split(","))
    except ValueError as e:
        print(f"bench_offline: error: {e}")
        return 2
    print_table(rows)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
