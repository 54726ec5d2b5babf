"""Online quality (stream/quality.py): hit@k and reciprocal rank of each event's item in its user's
last published list, against hand-computed ranks, and through the real processor (no broker)."""

import os

import numpy as np
import orjson
import pytest

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.base import EVENT_TYPES
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model, evaluate_model
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.state.codec import REC_FIELD
from livemb.state.record import decode, encode
from livemb.stream.metrics import Metrics
from livemb.stream.processor import ModelProcessor
from livemb.stream.quality import KS, NO_REC, REC_LEN, SOURCES, ranks, score_events
from livemb.stream.validate import ValidEvent
from livemb.tools.data.synth import synth_log

CLICK, VIEW = EVENT_TYPES.index("click"), EVENT_TYPES.index("view")


def test_ranks_by_hand() -> None:
    rec = np.array([[5, 3, 9, 0], [5, 3, 9, 0], [5, 3, 9, 0], [0, 0, 0, 0], [2, 2, 4, 0]])
    item = np.array([5, 9, 7, 0, 2])
    # 5 is first; 9 third; 7 absent; the unknown item 0 never matches an empty slot; first occurrence
    assert ranks(rec, item).tolist() == [1, 3, 0, 0, 1]


def test_score_events_by_hand() -> None:
    L = REC_LEN
    rec = np.zeros((3, L), np.int64)
    rec[0, :12] = [5, 3, 9, 21, 22, 23, 24, 25, 26, 27, 28, 30]  # user 0's list: 30 at rank 12
    rec[1] = NO_REC  # user 1 was never sent a list
    rec[2, :2] = [8, 6]
    mem = np.array([[3, 30, 0], [5, 0, 0], [0, 0, 0]])  # 3 and 30 are user 0's memory items (repeat path)
    user_of = np.array([0, 0, 0, 1, 0, 2, 2])
    item = np.array([3, 7, 9, 5, 0, 30, 8])
    etype = np.array([CLICK, VIEW, CLICK, CLICK, VIEW, CLICK, CLICK])
    q = score_events(rec, mem, user_of, item, etype)
    # targets: user 1 is not one; user 0: 3 (rank 2, repeat), 7 (miss), 9 (rank 3, explore), 0 (miss)
    # user 2: 30 (absent from user 2's list: miss though in user 0's), 8 (rank 1, explore)
    assert q.targets[CLICK] == 4 and q.targets[VIEW] == 2 and q.targets.sum() == 6
    assert q.rr_sum[CLICK] == pytest.approx(1 / 2 + 1 / 3 + 1) and q.rr_sum[VIEW] == 0
    rep, exp = SOURCES.index("repeat"), SOURCES.index("explore")
    want = {1: (0, 1), 5: (1, 2), 10: (1, 2), 20: (1, 2)}  # k -> (repeat hits, explore hits), all clicks
    for j, k in enumerate(KS):
        assert (q.hits[j, rep, CLICK], q.hits[j, exp, CLICK]) == want[k], k
        assert q.hits[j, :, VIEW].sum() == 0
    # rank 12 (the repeat item 30 of user 0) counts at k=20 only
    q2 = score_events(rec, mem, np.array([0]), np.array([30]), np.array([VIEW]))
    assert [int(q2.hits[j, rep, VIEW]) for j in range(len(KS))] == [0, 0, 0, 1]
    assert q2.rr_sum[VIEW] == pytest.approx(1 / 12)


def test_nobody_with_a_list_counts_nothing() -> None:
    q = score_events(np.full((2, REC_LEN), NO_REC), np.zeros((2, 3), np.int64), np.array([0, 1]),
                     np.array([4, 5]), np.array([CLICK, VIEW]))
    assert q.targets.sum() == 0 and q.hits.sum() == 0 and q.rr_sum.sum() == 0


def test_metrics_add_each_count_to_its_series() -> None:
    """Metrics.observe_quality: every nonzero count lands in its own (k, source, event type) series,
    the zeros change nothing (checked cell by cell against the counts, over several batches)."""
    from livemb.stream.quality import OnlineQuality

    rng = np.random.default_rng(3)
    m = Metrics()
    total = OnlineQuality()
    for _ in range(6):
        q = OnlineQuality()
        q.targets[:] = rng.integers(0, 3, len(EVENT_TYPES)) * (rng.random(len(EVENT_TYPES)) < 0.5)
        q.rr_sum[:] = q.targets * rng.random(len(EVENT_TYPES))
        q.hits[:] = rng.integers(0, 3, q.hits.shape) * (rng.random(q.hits.shape) < 0.3)
        m.observe_quality(q, "champion")
        total.targets += q.targets
        total.rr_sum += q.rr_sum
        total.hits += q.hits
    get = m.registry.get_sample_value
    for t, et in enumerate(EVENT_TYPES):
        assert get("livemb_online_targets_total", {"event_type": et, "model": "champion"}) == total.targets[t]
        assert get("livemb_online_reciprocal_rank_total", {"event_type": et, "model": "champion"}) == \
            pytest.approx(total.rr_sum[t], rel=1e-12)
        for j, k in enumerate(KS):
            for s, src in enumerate(SOURCES):
                labels = {"k": str(k), "source": src, "event_type": et, "model": "champion"}
                assert get("livemb_online_hits_total", labels) == total.hits[j, s, t]
    assert total.hits.sum() > 0 and (total.hits == 0).any()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    df, ids, vecs = synth_log(users=30, items=60, days=4, seed=5, dim=16)
    table = ItemTable(ids, vecs)
    table.save(tmp / "items.npz")
    model = build_model("hiertcn", table.padded_vectors(), hidden=32, channels=16)
    train_model(model, list(sequences_from_frame(df, table).values()), TrainConfig(epochs=1), progress=False)
    save_checkpoint(tmp / "m.pt", model, table.fingerprint)
    return df, table, Settings(model_path=str(tmp / "m.pt"), items_path=str(tmp / "items.npz"), topk=10)


def offline_counts(events, last: dict[str, list[str]], mem_of: dict[str, set[str]]) -> dict:
    """The counters recomputed from published messages: each event vs its user's previous list."""
    out = {"targets": 0, "rr": 0.0, "hits": dict.fromkeys(((k, s) for k in KS for s in SOURCES), 0)}
    for e in events:
        if e.user_id not in last:
            continue
        out["targets"] += 1
        cands = last[e.user_id]
        if e.item_id in cands:
            r = cands.index(e.item_id) + 1
            out["rr"] += 1 / r
            src = "repeat" if e.item_id in mem_of[e.user_id] else "explore"
            for k in KS:
                out["hits"][(k, src)] += r <= k
    return out


def test_processor_scores_each_event_against_the_previous_message(served):
    df, table, settings = served
    proc = ModelProcessor(settings)
    events = [ValidEvent(r.user_id, r.item_id, int(r.ts), r.event_type, r.event_id, 0, i)
              for i, r in enumerate(df.itertuples(index=False))]
    blobs: dict[str, bytes] = {}
    last: dict[str, list[str]] = {}
    metrics = Metrics()
    want = {"targets": 0, "rr": 0.0, "hits": dict.fromkeys(((k, s) for k in KS for s in SOURCES), 0)}
    for chunk in np.array_split(np.arange(len(events)), 9):
        batch = [events[i] for i in chunk]
        users = sorted({e.user_id for e in batch})
        # the memory the previous list was built from: the stored row's mem_item
        mem_of = {u: set(table.id_of(decode(blobs[u])[0]["mem_item"]).tolist()) - {""} for u in users if u in blobs}
        exp = offline_counts(batch, last, mem_of)
        res = proc.process(batch, {u: blobs.get(u) for u in users})
        q = res.quality
        assert q.targets.sum() == exp["targets"]
        assert q.rr_sum.sum() == pytest.approx(exp["rr"])
        for j, k in enumerate(KS):
            for s, src in enumerate(SOURCES):
                assert q.hits[j, s].sum() == exp["hits"][(k, src)], (k, src)
        metrics.observe_quality(q)
        want["targets"] += exp["targets"]
        want["rr"] += exp["rr"]
        for key, n in exp["hits"].items():
            want["hits"][key] += n
        blobs.update(res.states)
        for u, raw in res.outputs:
            last[u] = [c["item_id"] for c in orjson.loads(raw)["candidates"]]
    assert want["targets"] > 0.5 * len(events)  # most events had a previous list
    assert sum(want["hits"].values()) > 0  # hits are checked per batch above
    total = sum(metrics.registry.get_sample_value("livemb_online_targets_total", {"event_type": et, "model": "champion"}) or 0
                for et in EVENT_TYPES)
    rr = sum(metrics.registry.get_sample_value("livemb_online_reciprocal_rank_total",
                                                {"event_type": et, "model": "champion"}) or 0
             for et in EVENT_TYPES)
    assert total == want["targets"] and rr == pytest.approx(want["rr"])


def test_rows_without_the_list_are_read_and_not_scored(served):
    """A row written before the list was stored is continued (not refused), its events are not targets."""
    df, table, settings = served
    proc = ModelProcessor(settings)
    e1 = ValidEvent("u1", table.ids[3], 1_700_000_000_000, "click", "a", 0, 0)
    e2 = ValidEvent("u1", table.ids[4], 1_700_000_001_000, "view", "b", 0, 1)
    row = proc.process([e1], {"u1": None}).states["u1"]
    arrays, meta = decode(row)
    assert arrays[REC_FIELD].dtype == np.int32 and arrays[REC_FIELD].shape == (REC_LEN,)
    del arrays[REC_FIELD]
    res = proc.process([e2], {"u1": encode(arrays, meta)})
    assert res.rejected == {} and res.quality.targets.sum() == 0
    assert REC_FIELD in decode(res.states["u1"])[0]  # written back with the list
    res2 = proc.process([ValidEvent("u1", table.ids[5], 1_700_000_002_000, "view", "c", 0, 2)], res.states)
    assert res2.quality.targets[VIEW] == 1


def test_row_size_with_the_list(tmp_path):
    """The stored list costs REC_LEN int32 + its field header (98 bytes); a row of HierTCN at its
    default size over 64-d items stays under the 4 KiB budget."""
    rng = np.random.default_rng(0)
    table = ItemTable(np.array([f"i{k}" for k in range(50)]), rng.standard_normal((50, 64)).astype(np.float32))
    table.save(tmp_path / "items.npz")
    save_checkpoint(tmp_path / "m.pt", build_model("hiertcn", table.padded_vectors()), table.fingerprint)
    proc = ModelProcessor(Settings(model_path=str(tmp_path / "m.pt"), items_path=str(tmp_path / "items.npz")))
    row = proc.process([ValidEvent("u", table.ids[1], 1_700_000_000_000, "click", "a", 0, 0)], {"u": None}).states["u"]
    arrays, meta = decode(row)
    del arrays[REC_FIELD]
    assert len(row) - len(encode(arrays, meta)) == REC_LEN * 4 + 18
    assert len(row) <= 4096


@pytest.mark.parametrize("rep,excl", [("rep", "none"), ("rule", "session")])
def test_one_event_per_batch_equals_livemb_evaluate(tmp_path, rep, excl):
    """Each user's t-th event in batch t: live recall@K == `evaluate_model`'s for the served variant
    (each event scored before it is applied, on the whole catalogue), the first event of each user
    being the warm-up (live: no list yet). Sessions are turned off (gap 10^12 ms): on a target that
    opens a session the evaluation scores the next-session embedding, live the list of the previous
    event (docs/STREAMING.md "Online quality"). Live MRR is MRR@20, so at most the full-rank MRR."""
    df, ids, vecs = synth_log(users=40, items=100, days=3, seed=7, dim=16)
    table = ItemTable(ids, vecs)
    table.save(tmp_path / "items.npz")
    model = build_model("hiertcn", table.padded_vectors(), hidden=32, channels=16, session_gap_ms=10**12)
    seqs = sequences_from_frame(df, table)
    train_model(model, list(seqs.values()), TrainConfig(epochs=1), progress=False)
    save_checkpoint(tmp_path / "m.pt", model, table.fingerprint)
    proc = ModelProcessor(Settings(model_path=str(tmp_path / "m.pt"), items_path=str(tmp_path / "items.npz"),
                                   topk=20, repeat_path=rep, exclude_seen=excl))
    by_user = {u: list(g.itertuples(index=False)) for u, g in df.groupby("user_id")}
    blobs: dict[str, bytes] = {}
    hits, rr, n = np.zeros(len(KS)), 0.0, 0
    for t in range(max(map(len, by_user.values()))):
        batch = [ValidEvent(u, r.item_id, int(r.ts), r.event_type, r.event_id, 0, t)
                 for u, rows in by_user.items() if t < len(rows) for r in [rows[t]]]
        res = proc.process(batch, {e.user_id: blobs.get(e.user_id) for e in batch})
        blobs.update(res.states)
        hits += res.quality.hits.sum(axis=(1, 2))
        rr += res.quality.rr_sum.sum()
        n += int(res.quality.targets.sum())
    train = {u: tuple(a[:1] for a in s) for u, s in seqs.items()}
    test = {u: tuple(a[1:] for a in s) for u, s in seqs.items()}
    off = evaluate_model(proc.serving.model, train, test, progress=False)[f"{rep}+{excl}"]
    assert n == off["events_scored"] == len(df) - len(by_user)
    assert [h / n for h in hits] == pytest.approx([off[f"recall@{k}"] for k in KS], abs=1e-12)
    assert 0 < rr / n <= off["mrr"]


def test_the_stored_list_survives_an_item_table_swap(served, tmp_path):
    """The list is kept as item indices: a swapped item table (same ids, other order) remaps it by id."""
    df, table, settings = served
    items_path = tmp_path / "items.npz"
    table.save(items_path)
    proc = ModelProcessor(settings.model_copy(update={"items_path": str(items_path)}), reload_check_s=0.0)
    res = proc.process([ValidEvent("u1", table.ids[5], 1_700_000_000_000, "click", "a", 0, 0)], {"u1": None})
    sent = [c["item_id"] for c in orjson.loads(res.outputs[0][1])["candidates"]]
    swapped = ItemTable(table.ids[::-1].copy(), table.vectors[::-1].copy())
    swapped.save(items_path)
    os.utime(items_path, (1e9, 2e9))
    e2 = ValidEvent("u1", sent[2], 1_700_000_010_000, "cart", "b", 0, 1)  # the third candidate it was sent
    q = proc.process([e2], res.states).quality
    assert proc.serving.table.fingerprint == swapped.fingerprint
    cart = EVENT_TYPES.index("cart")
    assert q.targets[cart] == 1 and q.rr_sum[cart] == pytest.approx(1 / 3)
    assert [int(q.hits[j, :, cart].sum()) for j in range(len(KS))] == [0, 1, 1, 1]
