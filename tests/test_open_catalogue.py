"""The open catalogue (models/newitems.py): item ids absent from the item table enter the user's
new-item pool, come back as candidates under their real id, survive the stored row, stay bounded,
and the live batch step, `livemb embed` and the evaluation's test phase advance them alike."""

import hashlib

import numpy as np
import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models import EventBatch, newitems
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model, evaluate_model, warm_up
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.state.record import decode
from livemb.stream.processor import ModelProcessor
from livemb.stream.validate import ValidEvent
from livemb.tools.data.synth import synth_log
from livemb.tools.offline.commands import embed_users

T0 = 1_700_000_000_000


def new_items_checkpoint(tmp):
    """A small HierTCN whose item table lacks a quarter of the log's items (born after training),
    saved as tmp/m.pt + tmp/items.npz; returns (log, table). Shared with tests/test_newvectors.py."""
    df, ids, vecs = synth_log(users=30, items=80, days=4, seed=7, dim=16)
    keep = np.arange(len(ids)) % 4 != 0
    table = ItemTable(ids[keep], vecs[keep])
    table.save(tmp / "items.npz")
    torch.manual_seed(0)
    model = build_model("hiertcn", table.padded_vectors(), hidden=32, channels=16)
    train_model(model, list(sequences_from_frame(df, table).values()), TrainConfig(epochs=1), progress=False)
    save_checkpoint(tmp / "m.pt", model, table.fingerprint)
    return df, table


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open")
    df, table = new_items_checkpoint(tmp)
    settings = Settings(model_path=str(tmp / "m.pt"), items_path=str(tmp / "items.npz"), topk=10)
    return df, table, settings


def ev(user, item, i, etype="click"):
    return ValidEvent(user, item, T0 + i * 1000, etype, f"{user}-{i}", 0, i)


def test_keys_need_no_registry():
    keys, raw = newitems.keys_of(["sku-9", 123, "x" * 33, ""])
    want = int.from_bytes(hashlib.blake2b(b"sku-9", digest_size=8).digest(), "little") & ((1 << 63) - 1)
    assert keys[0] == want  # a pure function of the id: every worker, every restart
    assert keys[1] == newitems.keys_of(["123"])[0][0]  # an integer id is its decimal string, as in the item table
    assert keys[2] == keys[3] == 0  # too long / empty: not remembered
    assert bytes(raw[0]).rstrip(b"\0") == b"sku-9"


def test_new_item_clicked_twice_comes_back_after_the_row_is_stored(served):
    df, table, settings = served
    proc = ModelProcessor(settings)
    first = proc.process([ev("u", "fresh-1", 0), ev("u", table.ids[3], 1)], {"u": None})
    res = proc.process([ev("u", "fresh-1", 2, "cart")], first.states)
    assert res.unknown_items == 1  # still counted: it is absent from the item table
    cands = [c["item_id"] for c in orjson.loads(res.outputs[0][1])["candidates"]]
    assert "fresh-1" in cands
    # a restarted worker (a new processor) continues from the stored row alone
    again = ModelProcessor(settings).process([ev("u", table.ids[4], 3)], res.states)
    assert "fresh-1" in [c["item_id"] for c in orjson.loads(again.outputs[0][1])["candidates"]]
    row = decode(again.states["u"])[0]
    slot = int(np.flatnonzero(row["new_key"])[0])
    assert row["new_count"][slot] == 2 and len(again.states["u"]) <= 4096
    # off: nothing of the pool is written, and a row written with it is still read
    off = ModelProcessor(settings.model_copy(update={"open_catalogue": False}))
    closed = off.process([ev("u", table.ids[5], 4)], again.states)
    assert not closed.rejected and "new_key" not in decode(closed.states["u"])[0]
    assert "fresh-1" not in [c["item_id"] for c in orjson.loads(closed.outputs[0][1])["candidates"]]
    # and a row written without it (before it existed, or with it off) is read with it on
    back = proc.process([ev("u", "fresh-2", 5), ev("u", "fresh-2", 6)], closed.states)
    assert "fresh-2" in [c["item_id"] for c in orjson.loads(back.outputs[0][1])["candidates"]]


def test_one_off_ids_keep_the_row_bounded(served):
    """A stream of ids never seen twice: the pool keeps the NEW_SLOTS most recent, the row's size
    never changes, and the known memory is untouched."""
    df, table, settings = served
    proc = ModelProcessor(settings)
    states = {"u": None}
    proc_states = proc.process([ev("u", table.ids[1], 0)], states).states
    sizes = set()
    n = 0
    for _ in range(12):
        evs = [ev("u", f"once-{n + j}", 1 + n + j) for j in range(17)]
        n += len(evs)
        proc_states = proc.process(evs, proc_states).states
        sizes.add(len(proc_states["u"]))
    row = decode(proc_states["u"])[0]
    kept = {bytes(r).rstrip(b"\0").decode() for r in row["new_id"]}
    assert kept == {f"once-{i}" for i in range(n - newitems.NEW_SLOTS, n)}  # least recent evicted first
    assert len(sizes) == 1 and sizes.pop() <= 4096
    assert set(row["mem_item"][row["mem_item"] > 0].tolist()) == {1 + int(np.flatnonzero(table.ids == table.ids[1])[0])}


def test_live_microbatches_equal_embed_and_the_evaluation_replay(served):
    """Live = offline with new items: micro-batches through stored rows give `livemb embed`'s
    candidates (new ids included), and the evaluation's warm-up builds the same pools."""
    df, table, settings = served
    proc = ModelProcessor(settings)
    events = [ValidEvent(r.user_id, r.item_id, int(r.ts), r.event_type, r.event_id, 0, i)
              for i, r in enumerate(df.itertuples(index=False))]
    blobs: dict[str, bytes] = {}
    last: dict[str, dict] = {}
    for chunk in np.array_split(np.arange(len(events)), 5):
        batch = [events[i] for i in chunk]
        res = proc.process(batch, {e.user_id: blobs.get(e.user_id) for e in batch})
        blobs.update(res.states)
        last.update({u: orjson.loads(m) for u, m in res.outputs})
    offline = {u: orjson.loads(m) for u, m in embed_users(proc.serving, df)}
    known = set(table.ids.tolist())
    n_new = 0
    for u, want in offline.items():
        got = [c["item_id"] for c in last[u]["candidates"]]
        assert got == [c["item_id"] for c in want["candidates"]]
        n_new += sum(c not in known for c in got)
    assert n_new > 0  # new items do reach the candidates
    users = sorted(offline)
    seqs = sequences_from_frame(df, table)
    keys = newitems.key_sequences(df, table)
    model = proc.serving.model
    st, _ = warm_up(model, newitems.with_pool(model.init_state(len(users))), [seqs[u] for u in users],
                    [keys[u] for u in users])
    for b, u in enumerate(users):
        row = decode(blobs[u])[0]
        for f in ("new_key", "new_count", "new_seq", "new_ts", "new_sess", "new_etype", "new_seen"):
            assert np.array_equal(row[f], st[f][b].numpy()), (u, f)


def test_evaluation_ranks_new_item_repeats_and_keeps_the_closed_ranking(served):
    df, table, settings = served
    model = ModelProcessor(settings).serving.model
    cut = int(np.quantile(df["ts"], 0.7))
    tr, te = df[df["ts"] < cut], df[df["ts"] >= cut]
    train, test = sequences_from_frame(tr, table), sequences_from_frame(te, table)
    closed = evaluate_model(model, train, test, progress=False)
    both = evaluate_model(model, train, test, progress=False,
                          open_keys=(newitems.key_sequences(tr, table), newitems.key_sequences(te, table)))
    opened = both.pop("open_catalogue")
    assert both["rep+none"] == closed["rep+none"]  # the pool changes no other state
    assert opened["targets_new_item"] == closed["targets_skipped_unknown_item"] > 0
    assert 0 < opened["targets_new_item_in_pool"] < opened["targets_new_item"]
    scored = opened["rep+none"]["events_scored"]
    assert scored == closed["rep+none"]["events_scored"] + opened["targets_new_item_in_pool"]
    assert opened["rep+none"]["all_events"]["recall@20"] > closed["rep+none"]["all_events"]["recall@20"]


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_only_the_repeat_path_ranks_new_items(served, index):
    """The explore search (flat or faiss) never holds a new item: without a repeat path, or with
    the memory's items excluded, it cannot come back; with the rule it does."""
    df, table, settings = served
    events = [ev("u", "fresh-9", 0), ev("u", table.ids[2], 1), ev("u", "fresh-9", 2)]

    def candidates(**update):
        proc = ModelProcessor(settings.model_copy(update={"index": index, **update}))
        return [c["item_id"] for c in orjson.loads(proc.process(events, {"u": None}).outputs[0][1])["candidates"]]

    assert "fresh-9" in candidates(repeat_path="rule")
    assert "fresh-9" not in candidates(repeat_path="norep")
    assert "fresh-9" not in candidates(repeat_path="rule", exclude_seen="history")
    assert set(candidates(repeat_path="norep")) <= set(table.ids.tolist())


def test_a_swapped_in_table_absorbs_the_new_items_it_knows(served, tmp_path):
    """Items born after training, then added to the item table by a hot swap: the stored pools
    give them to the memory (with their counts), and a message lists each id once."""
    import os

    df, table, settings = served
    items_path = tmp_path / "items.npz"
    table.save(items_path)
    proc = ModelProcessor(settings.model_copy(update={"items_path": str(items_path)}), reload_check_s=0.0)
    rows = proc.process([ev("u", "fresh-1", 0), ev("u", "fresh-2", 1), ev("u", "fresh-1", 2)], {"u": None}).states
    grown = ItemTable(np.append(table.ids, "fresh-1"), np.vstack([table.vectors, table.vectors[:1]]))
    grown.save(items_path)
    os.utime(items_path, (1e9, 2e9))
    res = proc.process([ev("u", table.ids[0], 3)], rows)
    assert proc.serving.table.fingerprint == grown.fingerprint
    row = decode(res.states["u"])[0]
    slot = np.flatnonzero(row["mem_item"] == grown.lookup(["fresh-1"])[0])
    assert len(slot) == 1 and row["mem_count"][slot[0]] == 2  # its two touches came along
    kept = {bytes(r).rstrip(b"\0").decode() for r in row["new_id"][row["new_key"] > 0]}
    assert kept == {"fresh-2"}  # still unknown: still in the pool
    ids = [c["item_id"] for c in orjson.loads(res.outputs[0][1])["candidates"]]
    assert len(ids) == len(set(ids)) and "fresh-1" in ids


def reference_pool(stream: list[tuple[int, int]], S: int) -> dict[int, tuple[int, int]]:
    """The pool a plain LRU of S keys would hold after (key, etype) events: key -> (count, last seq)."""
    pool: dict[int, tuple[int, int]] = {}
    for seq, (key, _) in enumerate(stream):
        if key in pool:
            pool[key] = (pool[key][0] + 1, seq)
            continue
        if len(pool) == S:
            del pool[min(pool, key=lambda k: pool[k][1])]
        pool[key] = (1, seq)
    return pool


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 4)), min_size=1, max_size=60),
       st.integers(1, 7))
def test_pool_is_a_bounded_lru_of_keys(stream, split):
    """Any stream of new-item keys, in any batching: the pool holds exactly the NEW_SLOTS most
    recently touched keys with their counts, and never grows."""
    model = build_model("last", np.zeros((3, 4), np.float32))
    state = newitems.with_pool(model.init_state(1))
    cuts = sorted({0, len(stream), *range(split, len(stream), split)})
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        part = stream[a:b]
        ev_batch = EventBatch(torch.zeros(1, len(part), dtype=torch.int64), torch.tensor([[e for _, e in part]]),
                              torch.tensor([[T0 + 1000 * (a + j) for j in range(len(part))]]),
                              torch.ones(1, len(part), dtype=torch.bool))
        keys = torch.tensor([[k for k, _ in part]])
        pool = newitems.update_pool(model, state, ev_batch, keys)
        state, _ = model.step(state, ev_batch)
        state.update(pool)
        assert state["new_key"].shape == (1, newitems.NEW_SLOTS)
    want = reference_pool(stream, newitems.NEW_SLOTS)
    got = {int(k): (int(c), int(s)) for k, c, s in zip(state["new_key"][0], state["new_count"][0], state["new_seq"][0], strict=True)
           if k > 0}
    assert got == want


def test_online_quality_counts_a_new_item_hit(served):
    """The published list keeps a new item as its tag, so the user's next touch of it is an
    online hit from the repeat path, as for a known item."""
    from livemb.stream.quality import KS, SOURCES

    df, table, settings = served
    proc = ModelProcessor(settings.model_copy(update={"repeat_path": "rule"}))
    rows = proc.process([ev("u", "fresh-1", 0), ev("u", "fresh-1", 1)], {"u": None}).states
    rec = decode(rows["u"])[0]["rec_item"]
    assert (rec <= -2).sum() == 1  # the new item, tagged
    q = proc.process([ev("u", "fresh-1", 2)], rows).quality
    assert q.targets.sum() == 1 and q.hits[KS.index(20), SOURCES.index("repeat")].sum() == 1
    assert q.rr_sum.sum() > 0
