"""The idle-session sweep (stream/sweep.py): the open-session index, and the published next-session
embedding against offline `embed` on the same log, driven through the real BatchStep and
ModelProcessor with the in-memory store and sink (no broker)."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.serving import Serving
from livemb.stream.batch import BatchStep
from livemb.stream.processor import ModelProcessor
from livemb.stream.sweep import IdleSweep, OpenSessions
from livemb.tools.offline.commands import embed_users
from tests.inmemory import MemorySink, MemoryStore, record

MIN = 60_000
T0 = 1_700_000_000_000
P0, P1 = ("interactions", 0), ("interactions", 1)


def test_index_pops_only_due_users_in_time_order():
    idx = OpenSessions()
    idx.touch(P0, "a", 0)
    idx.touch(P0, "b", 10 * MIN)
    idx.touch(P0, "a", 20 * MIN)  # a moved on: its first entry is superseded
    idx.touch(P1, "c", 0)
    idx.touch(P0, "d", 60 * MIN)  # partition 0's clock is now 60 min
    assert idx.due(P0, 30 * MIN) == [("b", 10 * MIN), ("a", 20 * MIN)]
    assert idx.due(P0, 30 * MIN) == []  # popped once only
    assert idx.due(P1, 30 * MIN) == []  # partition 1's clock has not moved: nothing idle there
    assert idx.open_count() == 2  # d on P0, c on P1
    idx.forget([P1])
    assert idx.open_count() == 1 and idx.due(P1, 0) == []


def test_index_compacts_superseded_entries():
    idx = OpenSessions()
    for k in range(1000):
        idx.touch(P0, "u", k)
    idx.due(P0, 10**9)
    assert len(idx.parts[P0].heap) <= 64 + 4


def _log():
    """u_idle: one session then silence; u_busy: clicks every 10 min for 3 h on the same partition;
    u_other: alone on partition 1, also silent after its session."""
    rows = []
    for k in range(6):
        rows.append(("u_idle", f"i{k % 7}", T0 + k * MIN, 0))
        rows.append(("u_other", f"i{(k + 3) % 7}", T0 + k * MIN, 1))
    for k in range(19):
        rows.append(("u_busy", f"i{k % 5}", T0 + k * 10 * MIN, 0))
    rows.sort(key=lambda r: (r[2], r[0]))
    return rows


@pytest.fixture
def served(tmp_path):
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    table = ItemTable(np.array([f"i{k}" for k in range(7)], dtype=object), rng.standard_normal((7, 8)).astype(np.float32))
    items = table.save(tmp_path / "items.npz")
    model = build_model("hiertcn", table.padded_vectors(), hidden=16, channels=8)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, table.fingerprint)
    return Settings(model_path=str(ckpt), items_path=str(items), topk=3, idle_sweep_s=1.0), ckpt, items


def test_sweep_publishes_the_offline_next_session_embedding_once(served):
    settings, ckpt, items = served
    journal: list = []
    store, sink = MemoryStore(journal), MemorySink(journal)
    proc = ModelProcessor(settings)
    step = BatchStep(settings, proc, store, sink)
    sweep = IdleSweep(settings, proc, store, sink)
    offsets = {0: 0, 1: 0}
    recs = []
    for user, item, ts, part in _log():
        recs.append(record(user, item, ts, offsets[part], partition=part))
        offsets[part] += 1
    swept: list[tuple[int, dict]] = []

    async def drive() -> None:
        for i in range(0, len(recs), 4):
            batch = recs[i : i + 4]
            report = await step.run(batch)
            sweep.observe(batch, report.applied)
            n_before = len(sink.records)
            await sweep.run()
            swept.extend((i, orjson.loads(r.value)) for r in sink.records[n_before:])

    asyncio.run(drive())
    assert [m["user_id"] for _, m in swept] == ["u_idle"], "only u_idle is idle on a partition whose clock moved"
    at_batch, msg = swept[0]
    gap = settings.session_gap_s * 1000
    clock_at = max(r[2] for r in _log()[: at_batch + 4] if r[3] == 0)  # partition 0's clock at that sweep
    clock_before = max(r[2] for r in _log()[:at_batch] if r[3] == 0)
    assert clock_at - msg["event_ts"] > gap  # idle by then ...
    assert clock_before - msg["event_ts"] <= gap  # ... and not yet at the batch before: closed at once

    import pandas as pd

    df = pd.DataFrame([r[:3] for r in _log()], columns=["user_id", "item_id", "ts"]).assign(event_type="click")
    serving = Serving.load(str(ckpt), str(items), topk=3)
    offline = {u: orjson.loads(m) for u, m in embed_users(serving, df)}
    want = np.array(offline["u_idle"]["next_session_embedding"])
    got = np.array(msg["next_session_embedding"])
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    assert msg["embedding"] == msg["next_session_embedding"] and msg["session_closed"] is True
    assert not np.allclose(want, offline["u_idle"]["embedding"], atol=1e-3)  # folding changes the embedding
    assert msg["session_id"] == offline["u_idle"]["session_id"]
    assert msg["model"] == offline["u_idle"]["model"] and len(msg["candidates"]) == 3
    # every regular output carries the field too
    assert all(orjson.loads(r.value)["next_session_embedding"] is not None for r in sink.records)


def test_sweep_is_off_for_models_without_a_session_hierarchy(served, tmp_path):
    settings, _, items = served
    table = ItemTable.load(items)
    ckpt = tmp_path / "gru.pt"
    save_checkpoint(ckpt, build_model("gru", table.padded_vectors(), hidden=16, channels=8), table.fingerprint)
    s = settings.model_copy(update={"model_path": str(ckpt)})
    journal: list = []
    store, sink = MemoryStore(journal), MemorySink(journal)
    proc = ModelProcessor(s)
    step, sweep = BatchStep(s, proc, store, sink), IdleSweep(s, proc, store, sink)
    recs = [record("a", "i1", T0, 0), record("b", "i2", T0 + 120 * MIN, 1, partition=0)]

    async def drive() -> int:
        report = await step.run(recs)
        sweep.observe(recs, report.applied)
        return await sweep.run()

    assert asyncio.run(drive()) == 0
    assert all(orjson.loads(r.value)["next_session_embedding"] is None for r in sink.records)


def test_a_failing_sweep_never_raises_into_the_agent(served, caplog):
    settings, _, _ = served

    class Boom:
        def idle_messages(self, rows, last_ts):
            raise RuntimeError("boom")

    journal: list = []
    store, sink = MemoryStore(journal), MemorySink(journal)
    proc = ModelProcessor(settings)
    step = BatchStep(settings, proc, store, sink)
    sweep = IdleSweep(settings, Boom(), store, sink, clock=lambda: 100.0)
    recs = [record("a", "i1", T0, 0), record("b", "i2", T0 + 120 * MIN, 1)]

    async def drive() -> int:
        report = await step.run(recs)
        sweep.observe(recs, report.applied)
        return await sweep.maybe_run()

    assert asyncio.run(drive()) == 0
    assert "idle sweep failed" in caplog.text


def test_a_sweep_closes_at_most_its_cap_and_the_rest_after_the_next_batch() -> None:
    """Event time jumping (backfill -> live) makes thousands of sessions due at once: each sweep
    closes at most idle_sweep_max_sessions, and the next one runs after the next batch."""
    from livemb.stream.sweep import OpenSessions

    idx = OpenSessions()
    part = ("interactions", 0)
    for u in range(10):
        idx.touch(part, f"u{u}", 1_000 + u)
    idx.touch(part, "late", 10_000_000)  # moves the partition clock: every other user is due
    first = idx.due(part, gap_ms=1_000, limit=4)
    rest = idx.due(part, gap_ms=1_000, limit=100)
    assert [u for u, _ in first] == ["u0", "u1", "u2", "u3"]  # oldest first
    assert [u for u, _ in rest] == [f"u{u}" for u in range(4, 10)]
    assert idx.due(part, gap_ms=1_000) == []


def test_a_worker_behind_defers_the_sweep_until_it_catches_up_or_the_deferral_ends(served) -> None:
    """Lag above one full batch: no sweep (fresh events first); lag back under it: the due users
    are closed; still behind after idle_sweep_max_defer_s: the sweep runs anyway."""
    settings, _, _ = served
    s = settings.model_copy(update={"batch_max_events": 10, "idle_sweep_max_defer_s": 30.0})
    now = [100.0]
    journal: list = []
    store, sink = MemoryStore(journal), MemorySink(journal)
    proc = ModelProcessor(s)
    step = BatchStep(s, proc, store, sink)
    sweep = IdleSweep(s, proc, store, sink, clock=lambda: now[0])
    recs = [record("a", "i1", T0, 0), record("b", "i2", T0 + 120 * MIN, 1)]  # a is idle by b's event

    async def drive() -> list[int]:
        report = await step.run(recs)
        sweep.observe(recs, report.applied)
        got = [await sweep.maybe_run(lag=11)]  # behind: deferred
        now[0] += 10
        got.append(await sweep.maybe_run(lag=10))  # caught up (one batch left): a is closed
        later = [record("c", "i3", T0 + 240 * MIN, 2)]  # b is idle now
        report = await step.run(later)
        sweep.observe(later, report.applied)
        now[0] += 10
        got.append(await sweep.maybe_run(lag=500))  # behind, 10 s after the last sweep: deferred
        now[0] += 25
        got.append(await sweep.maybe_run(lag=500))  # behind for 35 s > 30 s: runs anyway
        return got

    assert asyncio.run(drive()) == [0, 1, 0, 1]
