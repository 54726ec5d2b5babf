"""stream.batch.BatchStep driven in-process (no Faust, no broker): the commit order, DLQ routing,
per-user isolation of bad rows, exact counters, and crash injection at every commit boundary
(Bytewax test_recovery style: abort, resume with the same store, assert exactly what replays)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from livemb.core.outcomes import DlqReason, Outcome
from livemb.core.settings import Settings
from livemb.state.guard import GuardState, unwrap, wrap
from livemb.state.record import decode, encode
from livemb.stream.batch import BatchStep, Step
from livemb.stream.dlq import REASON_HEADER, header
from livemb.stream.metrics import Metrics
from livemb.stream.ports import StepResult
from tests.counting import CountingProcessor
from tests.inmemory import Crash, CrashAt, CrashingStep, MemoryLog, MemorySink, MemoryStore, record

T0 = 1_700_000_000_000
SETTINGS = Settings(max_future_s=10 * 365 * 86400)  # fixed 2023 timestamps stay "not in the future"


def run(step: BatchStep, records):
    return asyncio.run(step.run(records))


def make(journal=None, store=None, sink=None, processor=None, metrics=None):
    journal = [] if journal is None else journal
    store = store if store is not None else MemoryStore(journal)
    sink = sink if sink is not None else MemorySink(journal)
    return BatchStep(SETTINGS, processor or CountingProcessor(), store, sink, metrics), store, sink


def stream_of(n_users: int = 4, per_user: int = 6):
    """Interleaved events of n users in one partition, offsets 0.. in arrival order."""
    recs = []
    for k in range(per_user):
        for u in range(n_users):
            recs.append(record(f"u{u}", f"i{k}", T0 + 1000 * k, len(recs), event_id=f"u{u}-{k}"))
    return recs


class OrderProcessor(CountingProcessor):
    """The counting processor, and the input offsets of the events it applied, in order."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def process(self, events, states):
        self.offsets += [e.offset for e in events]
        return super().process(events, states)


def count_of(store: MemoryStore, user: str, partition: int = 0) -> int:
    _, inner = unwrap(store.rows[(partition, user)], SETTINGS.dedupe_memory)
    return int(decode(inner)[1]["count"])


def test_outputs_are_acked_before_any_state_write() -> None:
    step, store, sink = make()
    run(step, stream_of(3, 2))
    kinds = [k for k, _ in step.store.journal]
    assert kinds.count("ack") == 3 and kinds.count("put") == 3
    assert kinds.index("put") > max(i for i, k in enumerate(kinds) if k == "ack")  # step 6 before step 7
    assert [orjson.loads(r.value)["count"] for r in sink.on("recommendations")] == [2, 2, 2]


def test_counters_and_dlq_reasons_are_exact() -> None:
    metrics = Metrics()
    step, store, sink = make(metrics=metrics)
    recs = [
        record("a", "i1", T0, 0, event_id="e1"),
        record("a", "i2", T0 + 10, 1, event_id="e1"),  # same event_id: duplicate
        record("a", "i3", T0 - 5, 2, event_id="e3"),  # older than last_ts: late (applied)
        record("a", "i4", T0 - 2 * 86_400_000, 3, event_id="e4"),  # beyond max_lateness: too_late
    ]
    bad = record("b", "i1", T0, 4)
    recs.append(type(bad)(bad.topic, bad.partition, bad.offset, bad.key, b"{not json"))
    report = run(step, recs)
    assert +report.counts == {"ok": 1, "duplicate": 1, "late": 1, "too_late": 1, "invalid": 1}
    assert report.dlq == {"too_late": 1, "not_json": 1}
    assert [header(r.headers, REASON_HEADER) for r in sink.on("interactions.dlq")] == ["not_json", "too_late"]
    assert [r.value for r in sink.on("interactions.dlq")] == [b"{not json", recs[3].value]  # the original bytes
    assert metrics.event_count("invalid") == 1 and metrics.event_count("ok") == 1
    assert count_of(store, "a") == 2
    again = run(step, recs)  # an at-least-once redelivery of the whole batch
    assert +again.counts == {"redelivered": 4, "invalid": 1} and count_of(store, "a") == 2


class FailingProcessor(CountingProcessor):
    def process(self, events, states) -> StepResult:
        raise RuntimeError("model bug")


def test_processor_failure_sends_exactly_the_applied_events_to_the_dlq() -> None:
    step, store, sink = make(processor=FailingProcessor())
    recs = [record("a", "i1", T0, 0, event_id="x"), record("a", "i1", T0 + 1, 1, event_id="x"),
            record("b", "i2", T0, 2, event_id="y")]
    report = run(step, recs)
    dlq = [(header(r.headers, REASON_HEADER), header(r.headers, "__connect.errors.offset"), r.key)
           for r in sink.on("interactions.dlq")]
    assert dlq == [("processing_error", "0", b"a"), ("processing_error", "2", b"b")]
    assert +report.counts == {"error": 2, "duplicate": 1}
    assert sink.on("recommendations") == []
    assert run(step, recs).counts["redelivered"] == 3  # guards advanced: a replay is not re-sent


class RefusingProcessor(CountingProcessor):
    """Refuses user "bad" in step 5 (as the model processor refuses a foreign state) and counts
    item "new" as unknown, as the model processor does for an item missing from the table."""

    def process(self, events, states) -> StepResult:
        res = super().process([e for e in events if e.user_id != "bad"], {u: b for u, b in states.items() if u != "bad"})
        res.rejected = {u: "another model's state" for u in states if u == "bad"}
        res.unknown_items = sum(e.item_id == "new" for e in events if e.user_id != "bad")
        return res


def mixed_batch():
    bad = record("c", "i1", T0, 4)
    return [
        record("a", "i1", T0, 0, event_id="e1"),  # ok
        record("a", "i2", T0 + 10, 1, event_id="e1"),  # duplicate
        record("a", "new", T0 + 20, 2, event_id="e2"),  # ok, and an unknown item
        record("bad", "i1", T0, 3, event_id="e3"),  # applied by the guard, then refused in step 5: error
        type(bad)(bad.topic, bad.partition, bad.offset, bad.key, b"{not json"),  # invalid
    ]


def test_a_mixed_batch_counts_one_outcome_per_event() -> None:
    metrics = Metrics()
    step, store, sink = make(processor=RefusingProcessor(), metrics=metrics)
    recs = mixed_batch()
    report = run(step, recs)
    assert report.counts == {Outcome.OK: 2, Outcome.DUPLICATE: 1, Outcome.ERROR: 1, Outcome.INVALID: 1,
                             Outcome.UNKNOWN_ITEM: 1}
    assert sum(n for o, n in report.counts.items() if o is not Outcome.UNKNOWN_ITEM) == len(recs)  # once each
    assert report.dlq == {DlqReason.STATE_UNREADABLE: 1, DlqReason.NOT_JSON: 1}
    assert all(type(r) is DlqReason for r in report.dlq)
    assert {o: metrics.event_count(o) for o in report.counts} == report.counts  # the same label strings
    # The same batch when the processor fails outright: every applied event (ok) becomes error, the
    # guard's other decisions stand, and no item is counted unknown (nothing was processed).
    step, _, sink = make(processor=FailingProcessor())
    report = run(step, recs)
    assert report.counts == {Outcome.ERROR: 3, Outcome.DUPLICATE: 1, Outcome.INVALID: 1}
    assert report.dlq == {DlqReason.PROCESSING_ERROR: 3, DlqReason.NOT_JSON: 1}
    assert sorted(header(r.headers, REASON_HEADER) for r in sink.on("interactions.dlq")) == [
        "not_json", "processing_error", "processing_error", "processing_error"]


def test_unreadable_and_foreign_rows_affect_only_their_user() -> None:
    step, store, sink = make()
    junk = b"JUNKJUNKJUNKJUNKJUNKJUNKJUNK"
    foreign = wrap(GuardState(SETTINGS.dedupe_memory), encode({"h": store_array()}, {"model": 1}))
    store.rows[(0, "junk")] = junk
    store.rows[(0, "foreign")] = foreign
    recs = [record(u, "i1", T0 + i, i) for i, u in enumerate(["junk", "good", "foreign", "good", "junk"])]
    report = run(step, recs)
    dlq = [(header(r.headers, REASON_HEADER), header(r.headers, "__connect.errors.offset"))
           for r in sink.on("interactions.dlq")]
    assert sorted(dlq) == [("state_unreadable", "0"), ("state_unreadable", "2"), ("state_unreadable", "4")]
    assert [r.key for r in sink.on("recommendations")] == [b"good"]
    assert count_of(store, "good") == 2
    assert store.rows[(0, "junk")] == junk and store.rows[(0, "foreign")] == foreign  # kept for inspection
    assert +report.counts == {"ok": 2, "error": 3}


def store_array():
    import numpy as np

    return np.zeros(2, np.int64)


# ---------------------------------------------------------------------------- crash injection
BATCHES = [slice(0, 8), slice(8, 16), slice(16, 24)]


def uninterrupted() -> tuple[dict, list[bytes]]:
    step, store, sink = make()
    recs = stream_of()
    for b in BATCHES:
        run(step, recs[b])
    return store.rows, [r.key for r in sink.on("recommendations")]


USERS = [f"u{u}".encode() for u in range(4)]  # batch 2 has 2 events of each, one output each, in this order

# Every crash point of batch 2, by step name -> (batch 2's outputs on the broker, in order: sent
# before the crash, then by the resumed worker; events of batch 2 it skips as redelivered).
CRASHES = {
    **{CrashAt(s): (USERS, 0) for s in (Step.GAPS, Step.VALIDATE, Step.READ, Step.GUARD, Step.PROCESS)},
    CrashAt(Step.PUBLISH, part=0): (USERS, 0),  # nothing reached the broker
    CrashAt(Step.PUBLISH, part=2): (USERS[:2] + USERS, 0),  # 2 of 4 outputs sent, then the crash: those 2 repeat
    CrashAt(Step.PUBLISH): (USERS + USERS, 0),  # all acked, no row written: all 4 repeat
    CrashAt(Step.WRITE, part=2): (USERS + USERS[2:], 4),  # 2 rows written: their events are now redelivered
    CrashAt(Step.WRITE): (USERS, 8),  # every row written, the offsets not committed: the replay is skipped
}


def crash_in_batch_2(crash: CrashAt, recs, journal: list, store: MemoryStore, sink: MemorySink) -> MemorySink:
    """Batch 1 runs, batch 2 dies at `crash`. Returns the broker's records so far."""
    run(make(journal, store, sink)[0], recs[BATCHES[0]])
    crash_sink = MemorySink(journal, crash)
    crash_sink.records = sink.records  # what reached the broker before the crash stays there
    store.arm(crash)
    crashing = CrashingStep(SETTINGS, CountingProcessor(), store, crash_sink, crash=crash)
    with pytest.raises(Crash):
        run(crashing, recs[BATCHES[1]])
    store.arm(None)
    return crash_sink


@pytest.mark.parametrize("crash", list(CRASHES), ids=str)
def test_crash_in_the_second_batch_then_resume(crash: CrashAt) -> None:
    """Batch 2 crashes at `crash`; its offsets were not committed, so the resumed worker gets batch 2
    again, then batch 3. State must equal the uninterrupted run byte for byte (exactly-once);
    outputs may repeat (at-least-once), and exactly the expected ones do."""
    want_rows, want_keys = uninterrupted()
    recs = stream_of()
    journal: list = []
    store = MemoryStore(journal)
    crash_sink = crash_in_batch_2(crash, recs, journal, store, MemorySink(journal))

    resumed, _, resumed_sink = make(journal, store, MemorySink(journal))
    resumed_sink.records = crash_sink.records
    report = run(resumed, recs[BATCHES[1]])
    run(resumed, recs[BATCHES[2]])

    assert store.rows == want_rows  # exactly-once for state
    keys = [r.key for r in resumed_sink.records if r.topic == "recommendations"]
    batch2, redelivered = CRASHES[crash]
    assert want_keys[4:8] == USERS
    assert keys == want_keys[:4] + batch2 + want_keys[8:]
    assert report.counts["redelivered"] == redelivered


def test_publish_fails_after_part_of_the_batch_was_sent() -> None:
    """The broker takes batch 2's first 2 outputs, then the worker dies before the other outputs
    and the DLQ record are sent. Nothing was written, nothing committed: the resumed worker applies
    all of batch 2 once and publishes all of it again, so exactly those 2 outputs reach the broker
    twice; every event counts once in the final state."""
    recs = stream_of()
    bad = record("u9", "i0", T0, 0)
    batch2 = [*recs[BATCHES[1]], type(bad)(bad.topic, 0, 99, bad.key, b"{not json")]  # + a DLQ record
    journal: list = []
    store = MemoryStore(journal)
    first, _, sink = make(journal, store)
    run(first, recs[BATCHES[0]])
    crash = CrashAt(Step.PUBLISH, part=2)
    crash_sink = MemorySink(journal, crash)
    crash_sink.records = sink.records
    with pytest.raises(Crash):
        run(make(journal, store, crash_sink)[0], batch2)
    assert [r.key for r in crash_sink.records[4:]] == USERS[:2]  # batch 1's 4 outputs, then the 2 sent
    assert store.puts == 4  # batch 1's rows only

    resumed, _, resumed_sink = make(journal, store, MemorySink(journal))
    resumed_sink.records = crash_sink.records
    replay = run(resumed, batch2)
    assert +replay.counts == {"ok": 8, "invalid": 1}  # nothing of batch 2 was applied before the crash
    run(resumed, recs[BATCHES[2]])

    topics_keys = [(r.topic, r.key) for r in resumed_sink.records]
    out = [("recommendations", u) for u in USERS]
    assert topics_keys == out + out[:2] + out + [("interactions.dlq", b"u9")] + out  # the DLQ keeps the key
    assert all(count_of(store, u.decode()) == 6 for u in USERS)  # 6 events each, applied once
    want_rows, _ = uninterrupted()
    assert store.rows == want_rows


# ---------------------------------------------------------------------------- skipped offsets
def test_records_skipped_right_after_an_assignment_are_re_read() -> None:
    """Faust can drop the first records it fetched after an assignment (docs/STREAMING.md). The
    first batch of a partition is checked against the group's committed offset: offsets 4-5 never
    reached the agent, are re-read from the log and applied first, in offset order."""
    recs = stream_of(2, 5)  # offsets 0..9, one partition
    log = MemoryLog(recs, committed={0: 4})
    journal: list = []
    store = MemoryStore(journal)
    first, _, _ = make(journal, store)
    run(first, recs[:4])  # a previous owner applied 0..3 and committed 4
    step = BatchStep(SETTINGS, CountingProcessor(), store, MemorySink(journal), None, log)  # new assignment
    report = run(step, recs[6:])
    assert log.reads == [(0, 4, 6)] and report.gap_records == 2
    assert count_of(store, "u0") == count_of(store, "u1") == 5  # every event once

    unseeded = BatchStep(SETTINGS, CountingProcessor(), MemoryStore([]), MemorySink([]), None, MemoryLog(recs))
    run(unseeded, recs[6:])  # without a committed offset the hole cannot be seen
    assert unseeded.gaps.reads == []


def test_a_hole_inside_a_partition_is_re_read() -> None:
    recs = stream_of(2, 5)
    log = MemoryLog(recs)
    step, store, _ = make()
    step.gaps = log
    run(step, recs[:3])
    run(step, recs[5:])  # 3 and 4 were dropped by the consumer
    assert log.reads == [(0, 3, 5)]
    assert count_of(store, "u0") == count_of(store, "u1") == 5


def test_a_hole_in_the_middle_of_a_batch_is_applied_in_offset_order() -> None:
    """A batch that holds offsets 2-3, then (after a hole 4-5) 6-9 of one partition: the re-read
    records go where they belong, between 3 and 6. Put before the whole batch, 4-5 would be
    applied first and 2-3 taken for redeliveries (seen once during a rebalance under load)."""
    recs = stream_of(2, 5)
    log = MemoryLog(recs)
    journal: list = []
    store = MemoryStore(journal)
    order = OrderProcessor()
    step = BatchStep(SETTINGS, order, store, MemorySink(journal), None, log)
    run(step, recs[:2])
    report = run(step, recs[2:4] + recs[6:])
    assert log.reads == [(0, 4, 6)] and report.counts["redelivered"] == 0
    assert order.offsets == list(range(10))  # every event once, in offset order
    assert count_of(store, "u0") == count_of(store, "u1") == 5


def test_a_re_created_input_topic_is_a_new_log_not_a_redelivery() -> None:
    """A broker that lost its data (Tansu memory storage restarted) or a re-created topic starts
    offsets at 0 again: those events are new, although their offsets are below the stored ones."""
    recs = stream_of(2, 5)  # offsets 0..9
    journal: list = []
    store = MemoryStore(journal)
    before = BatchStep(SETTINGS, CountingProcessor(), store, MemorySink(journal), None, MemoryLog(recs, log_id=11))
    run(before, recs)
    again = BatchStep(SETTINGS, CountingProcessor(), store, MemorySink(journal), None, MemoryLog(recs, log_id=11))
    assert run(again, recs[:4]).counts["redelivered"] == 4  # same log: a redelivery
    new_log = [record(f"u{k % 2}", "n", T0 + 99_000 + k, k, event_id=f"new-{k}") for k in range(4)]
    after = BatchStep(SETTINGS, CountingProcessor(), store, MemorySink(journal), None, MemoryLog(new_log, log_id=12))
    report = run(after, new_log)
    assert +report.counts == {"ok": 4}
    assert count_of(store, "u0") == count_of(store, "u1") == 7


def test_a_failed_topic_id_lookup_is_not_a_new_log() -> None:
    """A transient lookup failure (None) keeps the known id: redeliveries stay redeliveries."""
    recs = stream_of(2, 5)
    journal: list = []
    store = MemoryStore(journal)
    log = MemoryLog(recs, log_id=11)
    step = BatchStep(SETTINGS, CountingProcessor(), store, MemorySink(journal), None, log)
    run(step, recs)
    log.id = None
    step.forget([("interactions", 0)])  # a rebalance: the id is looked up again, and the lookup fails
    assert run(step, recs[:4]).counts["redelivered"] == 4
    assert count_of(store, "u0") == 5
