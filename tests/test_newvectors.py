"""New items' stream vectors (models/newvectors.py): the evidence, the fold, the extension's ranks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models import newitems, repeat
from livemb.models.base import session_flags
from livemb.models.evaluation import build_model, evaluate_model
from livemb.models.metrics import ranks_from_explore, ranks_of
from livemb.models.newvectors import Evidence, Timeline, log_timeline, sessions, window_pairs
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.tools.data.synth import synth_log
from tests.test_open_catalogue import new_items_checkpoint

GAP = 1000


def test_sessions_follow_the_session_clock():
    # a late event never moves the clock back: 5000 opens, 1500 does not (clock 5000), 6000 does not
    ts = np.array([0, 500, 5000, 1500, 6000, 7001])
    assert sessions(ts, GAP).tolist() == [0, 0, 1, 1, 1, 2]
    flags, _ = session_flags(torch.from_numpy(ts)[None], torch.ones(1, 6, dtype=torch.bool), torch.tensor([-1]), GAP, 8)
    assert (flags[0].long().cumsum(0) - 1).tolist() == sessions(ts, GAP).tolist()  # the model's rule


def test_window_pairs_pair_new_and_known_items_within_the_window_and_session():
    items = np.array([1, 0, 2, 2, 0, 3, 4])
    keys = np.array([0, 9, 0, 0, 8, 0, 0])
    ts = np.array([0, 1, 2, 3, 4, 5000, 5001])  # the last two open a session
    pos, key, item = window_pairs(items, keys, ts, GAP, window=2)
    got = set(zip(pos.tolist(), key.tolist(), item.tolist(), strict=True))
    # event 1 (key 9) after item 1; items 2 (events 2, 3) after key 9; key 8 after item 2 (once: distinct)
    assert got == {(1, 9, 1), (2, 9, 2), (3, 9, 2), (4, 8, 2)}
    # a wider window reaches further, never across the session break
    pos, key, item = window_pairs(items, keys, ts, GAP, window=6)
    got = set(zip(pos.tolist(), key.tolist(), item.tolist(), strict=True))
    assert (4, 8, 1) in got and (4, 9, 0) not in got
    assert all(p < 5 for p in pos.tolist())


def test_vector_is_the_mean_direction_at_the_mean_norm():
    ev = Evidence(dim=2, cap=10, min_evidence=2)
    ev.add(np.array([5]), np.array([[1.0, 0.0]]))
    assert len(ev.admitted()[0]) == 0  # one pair: not enough evidence yet
    ev.add(np.array([5]), np.array([[0.0, 3.0]]))
    keys, vecs = ev.admitted()
    assert keys.tolist() == [5]
    np.testing.assert_allclose(vecs[0], np.array([1.0, 3.0]) / np.sqrt(10) * 2.0, rtol=1e-6)  # norms 1 and 3


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 4)), min_size=1, max_size=40), st.randoms())
def test_fold_below_the_cap_does_not_depend_on_the_order(pairs, rnd):
    vecs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    keys = np.array([k for k, _ in pairs])
    rows = vecs[[i for _, i in pairs]]
    a, b = Evidence(3, 100, 2), Evidence(3, 100, 2)
    a.add(keys, rows)
    perm = list(range(len(pairs)))
    rnd.shuffle(perm)
    for j in perm:  # one pair at a time, in another order
        b.add(keys[[j]], rows[[j]])
    for x, y in zip(a.admitted(), b.admitted(), strict=True):
        assert np.array_equal(x, y)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 50), st.integers(1, 400))
def test_memory_is_bounded_under_one_off_ids(cap, n):
    ev = Evidence(4, cap, 1)
    hot = np.array([7])
    for i in range(n):  # a stream of one-off ids, one hot id touched every third batch
        ev.add(np.array([1000 + i]), np.ones((1, 4)))
        if i % 3 == 0:
            ev.add(hot, np.ones((1, 4)))
    assert len(ev) == min(cap, n + 1)  # n one-off ids and the hot one, at most `cap` of them
    assert ev.sums.shape == (cap, 4) and ev.evicted >= n + 1 - cap
    assert list(ev.rows)[-1] == (7 if (n - 1) % 3 == 0 else 1000 + n - 1)  # the last touched key is kept
    if cap >= 4:  # touched within the last `cap` keys: never evicted
        assert 7 in ev.rows


def test_timeline_snapshots_see_only_earlier_evidence():
    vecs = np.eye(3, dtype=np.float32)
    tl = Timeline(np.array([10, 20, 30]), np.array([4, 4, 5]), vecs, np.array([15, 25, 40]), dim=3, cap=10, min_evidence=2)
    assert tl.at(np.array([0, 15, 24, 25, 99])).tolist() == [-1, 0, 0, 1, 2]
    assert len(tl.snapshot(-1)[0]) == 0 and len(tl.snapshot(0)[0]) == 0
    assert tl.snapshot(1)[0].tolist() == [4] and tl.snapshot(2)[0].tolist() == [4]


def test_ranks_with_the_extension_equal_ranks_of_the_merged_scores():
    """ranks_from_explore with the extension's columns == ranks_of on the catalogue's merged
    scores with the extension's scores appended (integer scores: exact)."""
    g = torch.Generator().manual_seed(3)
    B, N, M, E = 50, 25, 5, 7
    base = torch.randint(0, 6, (B, N + 1), generator=g).float()
    base[:, 0] = -float("inf")
    mem_item = torch.stack([torch.randperm(N, generator=g)[:M] + 1 for _ in range(B)])
    shift = torch.randint(-3, 3, (B,), generator=g).float()
    mem = torch.randint(0, 9, (B, M), generator=g).float()
    ext = torch.randint(-2, 8, (B, E), generator=g).float()
    ext[::3, -2:] = -float("inf")  # padding / the user's pool items
    ext_col = torch.randint(0, E - 2, (B,), generator=g)
    to_ext = torch.rand(B, generator=g) < 0.4
    ext_target = torch.zeros(B, E, dtype=torch.bool)
    ext_target[to_ext, ext_col[to_ext]] = True
    target = torch.where(torch.rand(B, generator=g) < 0.5, mem_item[:, 0], torch.randint(1, N + 1, (B,), generator=g))
    target = torch.where(to_ext, torch.zeros_like(target), target)  # a new item: no catalogue index
    st_ = {"mem_item": mem_item, "mem_sess": torch.randint(0, 2, (B, M), generator=g), "session": torch.ones(B, dtype=torch.long)}
    merged = base + shift[:, None]
    merged.scatter_(1, mem_item, mem)
    merged[:, 0] = -float("inf")
    full = torch.cat([merged, ext], 1)
    full_target = torch.where(to_ext, N + 1 + ext_col, target)
    fast = ranks_from_explore(base, target, mem_item, shift, mem, {e: repeat.excluded_slots(st_, e) for e in ("session", "history")},
                              ext=ext, ext_target=ext_target)
    for e in ("none", "session", "history"):
        mask = repeat.seen_mask(st_, N + 1, e)
        mask = None if mask is None else torch.cat([mask, torch.zeros(B, E, dtype=torch.bool)], 1)
        want = ranks_of(full, full_target, mask)
        if mask is not None:  # an excluded target's worst rank counts the catalogue only
            want = torch.where(mask.gather(1, full_target[:, None])[:, 0], torch.full_like(want, N), want)
        assert torch.equal(fast[e], want), e


@pytest.fixture(scope="module")
def small():
    """A small HierTCN whose item table lacks a quarter of the log's items, and a time split."""
    df, ids, vecs = synth_log(users=30, items=80, days=4, seed=7, dim=16)
    keep = np.arange(len(ids)) % 4 != 0
    table = ItemTable(ids[keep], vecs[keep])
    torch.manual_seed(0)
    model = build_model("hiertcn", table.padded_vectors(), hidden=32, channels=16)
    train_model(model, list(sequences_from_frame(df, table).values()), TrainConfig(epochs=1), progress=False)
    cut = int(np.quantile(df["ts"], 0.7))
    tr, te = df[df["ts"] < cut], df[df["ts"] >= cut]
    seqs = (sequences_from_frame(tr, table), sequences_from_frame(te, table))
    keys = (newitems.key_sequences(tr, table), newitems.key_sequences(te, table))
    return model, table, seqs, keys


def _timeline(model, table, seqs, keys, min_evidence):
    empty = (np.zeros(0, np.int64),) * 3
    cat = {u: tuple(np.concatenate([a, b]) for a, b in zip(seqs[0].get(u, empty), seqs[1].get(u, empty), strict=True))
           for u in set(seqs[0]) | set(seqs[1])}
    ks = {u: np.concatenate([keys[0].get(u, np.zeros(0, np.int64)), keys[1].get(u, np.zeros(0, np.int64))]) for u in cat}
    query = np.concatenate([s[2] for s in seqs[1].values()])
    return log_timeline(cat, ks, table.padded_vectors(), query, gap_ms=model.cfg.session_gap_ms, window=3, cap=1000,
                        min_evidence=min_evidence, step_ms=600_000)


def test_evaluation_with_the_extension(small):
    """No vector yet: the ranking with the extension is the pool's; with vectors, the new-item
    targets outside the pool that have one are scored too (and the others are unchanged in count)."""
    model, table, seqs, keys = small
    none = evaluate_model(model, *seqs, progress=False, open_keys=keys, new_vectors=_timeline(model, table, seqs, keys, 10**9))
    assert none["open_catalogue_vectors"]["targets_new_item_in_index"] == 0
    for v in ("rep+none", "rule+session", "norep+history"):
        assert none["open_catalogue_vectors"][v] == none["open_catalogue"][v]
    some = evaluate_model(model, *seqs, progress=False, open_keys=keys, new_vectors=_timeline(model, table, seqs, keys, 1))
    vec, pool = some["open_catalogue_vectors"], some["open_catalogue"]
    assert vec["targets_new_item_in_index"] > 0
    assert vec["rep+none"]["events_scored"] == pool["rep+none"]["events_scored"] + vec["targets_new_item_in_index"]
    assert vec["via_index"]["rep+none"]["events_scored"] == vec["targets_new_item_in_index"]
    assert some["rep+none"] == none["rep+none"]  # the closed ranking is untouched


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("hiertcn", np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32), hidden=8, channels=4,
                       session_gap_ms=GAP)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2500)), min_size=1, max_size=30), st.integers(1, 30),
       st.integers(1, 8))
def test_live_pairs_from_the_state_equal_the_log_pairs(tiny_model, events, split, window):
    """`state_pairs` over micro-batches of any size == `window_pairs` over the user's whole log."""
    from collections import Counter

    from livemb.models import EventBatch
    from livemb.models.newvectors import state_pairs

    model = tiny_model
    items = np.array([v + 1 if v < 4 else 0 for v, _ in events], np.int64)  # known items 1..4
    keys = np.array([0 if v < 4 else 100 + v for v, _ in events], np.int64)  # new items 104..106
    ts = np.cumsum([g for _, g in events]).astype(np.int64)
    et = np.zeros(len(events), np.int64)
    _, k_log, i_log = window_pairs(items, keys, ts, GAP, window)
    state = newitems.with_pool(model.init_state(1))
    live = Counter()
    for a in range(0, len(events), split):
        sl = slice(a, a + split)
        ev = EventBatch.from_sequences([items[sl]], [et[sl]], [ts[sl]])
        kt = torch.from_numpy(keys[sl])[None]
        _, k, i = state_pairs(state, ev, kt, GAP, model.cfg.dt_buckets, window)
        live.update(zip(k.tolist(), i.tolist(), strict=True))
        new, _ = model.step(state, ev)
        new.update(newitems.update_pool(model, state, ev, kt))
        state = new
    assert live == Counter(zip(k_log.tolist(), i_log.tolist(), strict=True))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A checkpoint + item table for the worker's processor (a quarter of the log's items left out)."""
    tmp = tmp_path_factory.mktemp("newvec")
    _, table = new_items_checkpoint(tmp)
    # topk above the catalogue: every candidate is listed, so membership is a test of the wiring alone
    settings = Settings(model_path=str(tmp / "m.pt"), items_path=str(tmp / "items.npz"), topk=len(table) + 10,
                        new_item_vectors=True, new_item_min_evidence=2)
    return table, settings


def test_worker_new_item_joins_the_explore_candidates_of_another_user(served):
    """A new item clicked between known items by one user enters another user's candidates (who
    never touched it) once its pairs, read back as the evidence topic's record, reach
    min_evidence; a processor that folds the same records holds the same extension; with
    new_item_vectors off nothing is published."""
    import orjson

    from livemb.core.events import ValidEvent
    from livemb.state.codec import REC_FIELD
    from livemb.state.record import decode
    from livemb.stream.processor import ModelProcessor
    from livemb.stream.quality import REC_LEN, new_item_tags

    table, settings = served
    T0 = 1_700_000_000_000

    def ev(user, item, i):
        return ValidEvent(user, item, T0 + i * 1000, "click", f"{user}-{i}", 0, i)

    def cands(res, user):
        return [c["item_id"] for c in orjson.loads(dict(res.outputs)[user])["candidates"]]

    for on in (True, False):
        proc = ModelProcessor(settings.model_copy(update={"new_item_vectors": on}))
        a = proc.process([ev("a", table.ids[1], 0), ev("a", "born-1", 1), ev("a", table.ids[2], 2)], {"a": None})
        assert (a.new_item_evidence is not None) is on
        if on:
            assert proc.indexed == 0  # nothing folded until the record is read back
            assert proc.apply_evidence(a.new_item_evidence) == 2  # (born-1, item 1) and (born-1, item 2)
            assert proc.indexed == 1
            other = ModelProcessor(settings)  # another worker reading the same record
            other.apply_evidence(a.new_item_evidence)
            assert np.array_equal(other.extension.keys, proc.extension.keys)
            assert torch.equal(other.extension.vecs, proc.extension.vecs)
        b = proc.process([ev("b", table.ids[1], 3)], {"b": None})
        assert ("born-1" in cands(b, "b")) is on
        if on:  # the stored list (online quality) carries it as its key's tag, where it is in the list's head
            rec = decode(b.states["b"])[0][REC_FIELD]
            pos = cands(b, "b").index("born-1")
            tag = new_item_tags(newitems.keys_of(["born-1"])[0])[0]
            assert (rec[pos] == tag) if pos < REC_LEN else (tag not in rec)


def test_evidence_record_round_trip_and_a_bad_record():
    from livemb.stream import evidence

    keys, new, known = evidence.decode(evidence.encode(np.array([5, 7]), ["n-1", "n-2"], ["a", "b"]))
    assert keys.tolist() == [5, 7] and new == ["n-1", "n-2"] and known == ["a", "b"]
    for bad in (b"{", b'{"k": [1], "n": [], "i": []}', b'{"k": 1}'):
        assert len(evidence.decode(bad)[0]) == 0  # skipped, never raised into the worker's timer
