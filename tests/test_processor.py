"""The live batch step without a broker: micro-batches through stored blobs == offline embed."""

import numpy as np
import orjson
import pytest
import torch

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.stream.processor import ModelProcessor
from livemb.stream.validate import ValidEvent
from livemb.tools.data.synth import synth_log
from livemb.tools.offline.commands import embed_users


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proc")
    df, ids, vecs = synth_log(users=40, items=80, days=5, seed=3, dim=16)
    table = ItemTable(ids, vecs)
    table.save(tmp / "items.npz")
    model = build_model("hiertcn", table.padded_vectors(), hidden=32, channels=16)
    train_model(model, list(sequences_from_frame(df, table).values()), TrainConfig(epochs=1), progress=False)
    save_checkpoint(tmp / "m.pt", model, table.fingerprint)
    settings = Settings(model_path=str(tmp / "m.pt"), items_path=str(tmp / "items.npz"), topk=10)
    return df, table, settings


def events_of(df):
    return [
        ValidEvent(r.user_id, r.item_id, int(r.ts), r.event_type, r.event_id, 0, i)
        for i, r in enumerate(df.itertuples(index=False))
    ]


def test_microbatches_equal_offline_embed(served):
    df, table, settings = served
    proc = ModelProcessor(settings)
    events = events_of(df)
    blobs: dict[str, bytes] = {}
    last_msg: dict[str, dict] = {}
    for chunk in np.array_split(np.arange(len(events)), 7):
        batch = [events[i] for i in chunk]
        users = {e.user_id for e in batch}
        res = proc.process(batch, {u: blobs.get(u) for u in users})
        blobs.update(res.states)
        assert len(res.outputs) == len(users)  # one message per user per batch
        for u, raw in res.outputs:
            last_msg[u] = orjson.loads(raw)
    offline = {u: orjson.loads(m) for u, m in embed_users(proc.serving, df)}
    assert set(offline) == set(last_msg) == set(df["user_id"])
    for u, want in offline.items():
        got = last_msg[u]
        assert np.abs(np.array(got["embedding"]) - np.array(want["embedding"])).max() <= 1e-4
        assert [c["item_id"] for c in got["candidates"]][:5] == [c["item_id"] for c in want["candidates"]][:5]
        assert got["session_id"] == want["session_id"] and got["model"] == want["model"]
        assert len(got["candidates"]) == settings.topk


def test_unknown_items_are_counted_and_state_is_fixed_size(served):
    df, table, settings = served
    proc = ModelProcessor(settings)
    ev = [ValidEvent("u-new", "no-such-item", 1_700_000_000_000, "click", "e1", 0, 0),
          ValidEvent("u-new", table.ids[0], 1_700_000_001_000, "cart", "e2", 0, 1)]
    res = proc.process(ev, {"u-new": None})
    assert res.unknown_items == 1 and res.sessions_started == 1
    assert len(res.states["u-new"]) <= 4096
    msg = orjson.loads(res.outputs[0][1])
    assert msg["items_version"] == table.fingerprint and len(msg["embedding"]) == table.dim


def test_hot_swap_of_items_remaps_state(served, tmp_path):
    df, table, settings = served
    items_path = tmp_path / "items.npz"
    table.save(items_path)
    s = settings.model_copy(update={"items_path": str(items_path)})
    proc = ModelProcessor(s, reload_check_s=0.0)
    e1 = ValidEvent("u1", table.ids[5], 1_700_000_000_000, "click", "a", 0, 0)
    e0 = ValidEvent("u0", table.ids[2], 1_700_000_000_000, "click", "z", 0, 2)
    new = proc.process([e0, e1], {"u0": None, "u1": None}).states
    from livemb.state.record import decode, decode_rows

    decode(new["u1"])  # the layout is known: the rows go through the batch decoder (decode_rows)
    assert decode_rows([new["u0"], new["u1"]])[0] == [0, 1]
    # reversed catalogue order: same ids and vectors, different indices and fingerprint
    swapped = ItemTable(table.ids[::-1].copy(), table.vectors[::-1].copy())
    swapped.save(items_path)
    import os

    os.utime(items_path, (1e9, 2e9))
    e2 = ValidEvent("u1", table.ids[6], 1_700_000_010_000, "click", "b", 0, 1)
    e3 = ValidEvent("u0", table.ids[3], 1_700_000_010_000, "click", "y", 0, 3)
    res = proc.process([e2, e3], new)
    new2, outs = res.states, res.outputs
    assert proc.serving.table.fingerprint == swapped.fingerprint
    for user, want in (("u1", {table.ids[5], table.ids[6]}), ("u0", {table.ids[2], table.ids[3]})):
        mem = decode(new2[user])[0]["mem_item"]
        assert set(swapped.id_of(mem[mem > 0]).tolist()) == want  # the old item survived the swap by id
    assert orjson.loads(outs[0][1])["items_version"] == swapped.fingerprint
    assert torch.get_num_threads() == settings.torch_threads


def test_foreign_and_unreadable_rows_are_refused_per_user(served):
    """A row written by another model, or not a state record at all, refuses only its own user."""
    from livemb.state.record import encode

    df, table, settings = served
    proc = ModelProcessor(settings)
    other_model = encode({"hist": np.zeros(3, np.int64)}, {"count": 3})
    batch = [ValidEvent(u, table.ids[1], 1_700_000_000_000 + i, "click", f"e{i}", 0, i)
             for i, u in enumerate(["foreign", "good", "junk", "good"])]
    res = proc.process(batch, {"foreign": other_model, "good": None, "junk": b"not a record at all"})
    assert set(res.rejected) == {"foreign", "junk"}
    assert "another model" in res.rejected["foreign"]
    assert set(res.states) == {"good"} and [u for u, _ in res.outputs] == ["good"]


@pytest.mark.parametrize("n", [1, 5, 64, 65, 300])
def test_group_by_user_of_few_and_many_events(n):
    """The dict pass of a live batch (<= 64 events) and the sort of a big one give the same
    groups: users in order of first appearance, each user's events in arrival order."""
    from livemb.models import grouping
    rng = np.random.default_rng(n)
    users = np.array([f"u{k}" for k in rng.integers(0, max(1, n // 3), size=n)], dtype=object)
    got_users, got = grouping.group_by_user(users)
    want_users = list(dict.fromkeys(users.tolist()))
    assert got_users.tolist() == want_users and got_users.dtype == object
    assert [g.tolist() for g in got] == [[i for i, u in enumerate(users) if u == w] for w in want_users]
