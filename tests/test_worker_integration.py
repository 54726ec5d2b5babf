"""The worker against a real embedded Tansu broker, with the CountingProcessor (no model).

Workers run as subprocesses (`livemb worker --processor tests.counting:make_processor`) and are stopped by PID (SIGTERM / SIGKILL).
Every wait is an explicit poll with a timeout.
"""

from __future__ import annotations

import collections
import signal
import threading
from collections.abc import Callable

import orjson
import pytest

from livemb.state.guard import unwrap
from livemb.state.record import decode
from livemb.stream.broker import EmbeddedBroker
from livemb.stream.dlq import DlqEntry
from livemb.stream.metrics import Metrics, serve, summarize_histogram
from tests.conftest import WorkerProc, consume_all, event, produce, wait_until

T0 = 1_700_000_000_000  # event times are historic: replayed logs, far below "future"
DAY = 86_400_000
CHANGELOG = "livemb-user_state-changelog"


def setup_topics(b: EmbeddedBroker) -> None:
    b.create_topics(["interactions", "recommendations"], partitions=4)
    b.create_topics(["interactions.dlq"], partitions=1)


class Outputs:
    """Accumulates `recommendations`: the last count per user."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        tps = [TopicPartition("recommendations", p) for p in range(4)]
        self.c.assign(tps)
        self.c.seek_to_beginning(*tps)
        self.last: dict[str, int] = {}
        self.n = 0

    def poll(self) -> dict[str, int]:
        for recs in self.c.poll(200, max_records=20000).values():
            for r in recs:
                d = orjson.loads(r.value)
                assert r.key == d["user_id"].encode()
                self.last[d["user_id"]] = d["count"]
                self.n += 1
        return self.last

    def wait_for(self, expected: dict[str, int], timeout: float, w: WorkerProc | None = None) -> None:
        try:
            wait_until(lambda: self.poll() == expected, timeout, f"outputs == expected ({len(expected)} users)")
        except BaseException:
            diff = {u: (self.last.get(u), c) for u, c in expected.items() if self.last.get(u) != c}
            pos = {tp.partition: self.c.position(tp) for tp in self.c.assignment()}
            metrics = {o: w.metric("livemb_events_total", outcome=o) for o in ("ok", "redelivered")} if w else {}
            metrics["input_gaps"] = w.metric("livemb_input_gaps_total") if w else 0
            lag = {p: w.metric("livemb_consumer_lag", partition=str(p)) for p in range(4)} if w else {}
            print(f"DIAG users off={len(diff)} e.g. {list(diff.items())[:5]} reader positions={pos} "
                  f"outputs read={self.n} worker={metrics} lag={lag} alive={w.alive() if w else None}")
            raise

    def close(self) -> None:
        self.c.close()


def table_counts(w: WorkerProc) -> dict[str, tuple[int, int, int]]:
    """user -> (db partition, count, stored input offset) from the stopped worker's RocksDB."""
    out = {}
    for user, (part, blob) in w.read_table().items():
        g, inner = unwrap(blob, 16)
        assert inner is not None
        out[user] = (part, int(decode(inner)[1]["count"]), g.offset)
    return out


@pytest.mark.integration
def test_counts_dlq_replay_and_partitions(broker: EmbeddedBroker, worker_factory: Callable[..., WorkerProc]) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start()
    # /healthz answers as soon as the process is up; /readyz only after tables are recovered.
    wait_until(lambda: w.http("/healthz")[0] == 200 or not w.alive(), 30, "/healthz")
    assert w.http("/readyz")[0] == 503
    w.wait_ready()
    assert orjson.loads(w.http("/readyz")[1])["ready"] is True

    users = [f"user-{i}" for i in range(300)]
    good = [event(users[i % 300], i, T0 + i * 1000) for i in range(3000)]
    expected = collections.Counter(users[i % 300] for i in range(3000))
    late_user = users[7]
    bad: list[tuple[bytes | None, bytes]] = [
        (b"x", b"not json at all"),
        (b"x", b"\xff\xfe binary"),
        (b"x", b"[1, 2, 3]"),
        (b"u1", orjson.dumps({"item_id": 1, "ts": T0})),
        (b"u1", orjson.dumps({"user_id": "u1", "ts": T0})),
        (b"u1", orjson.dumps({"user_id": "u1", "item_id": 1, "ts": "soon"})),
        (b"u1", orjson.dumps({"user_id": "u1", "item_id": 1, "ts": True})),
        (b"u1", orjson.dumps({"user_id": "u1", "item_id": 1, "ts": T0, "pad": "p" * 70_000})),
        (b"u1", orjson.dumps({"user_id": "u1", "item_id": 1, "ts": 4_000_000_000_000})),
        (b"other", orjson.dumps({"user_id": "u1", "item_id": 1, "ts": T0})),
        (b"x" * 200, orjson.dumps({"user_id": "x" * 200, "item_id": 1, "ts": T0})),
    ]
    want_reasons = collections.Counter(
        ["not_json", "not_json", "not_object", "missing_field:user_id", "missing_field:item_id", "bad_value:ts",
         "bad_type:ts", "oversized", "future_ts", "key_mismatch", "user_id_too_long", "too_late"]
    )  # fmt: skip
    # After the good events: one late (applied) and one too_late (DLQ) event for late_user.
    tail = [event(late_user, "late", T0 + 2_000_000), event(late_user, "ancient", T0 - 2 * DAY)]
    expected[late_user] += 1
    parts = produce(broker.bootstrap, good + bad + tail)
    user_part = {users[i % 300]: parts[i] for i in range(3000)}

    out = Outputs(broker.bootstrap)
    try:
        out.wait_for(dict(expected), 90, w)
        wait_until(lambda: w.metric("livemb_events_total", outcome="too_late") == 1, 30, "too_late counted")
        n_valid = 3000 + 1
        assert w.metric("livemb_events_total", outcome="ok") == n_valid - 1
        assert w.metric("livemb_events_total", outcome="late") == 1
        assert w.metric("livemb_events_total", outcome="invalid") == len(bad)
        assert w.metric("livemb_events_total", outcome="duplicate") == 0
        dlq = wait_until(
            lambda: (r := consume_all(broker.bootstrap, "interactions.dlq", 0.5)) and len(r) >= len(want_reasons) and r,
            30, "DLQ records",
        )  # fmt: skip
        entries = [DlqEntry(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers)) for r in dlq]
        assert collections.Counter(e.reason for e in entries) == want_reasons
        binary = next(e for e in entries if e.value == b"\xff\xfe binary")  # the original bytes, key kept
        assert (binary.reason, binary.key, binary.error()["topic"]) == ("not_json", b"x", "interactions")
        assert all(None not in e.error().values() for e in entries)  # every error header present
        _, metrics_body = w.http("/metrics")
        assert b"livemb_event_to_publish_seconds_bucket" in metrics_body and b"livemb_batch_size" in metrics_body

        # Upstream replays everything: same event ids at new offsets -> all duplicates, no change.
        n_outputs = out.n
        produce(broker.bootstrap, good + tail[:1])
        wait_until(lambda: w.metric("livemb_events_total", outcome="duplicate") == n_valid, 60, "duplicates")
        assert out.poll() == dict(expected) and out.n == n_outputs  # nothing applied, nothing re-published
    finally:
        out.close()

    assert w.stop(signal.SIGTERM) == 0
    rows = table_counts(w)
    assert {u: c for u, (_, c, _) in rows.items()} == dict(expected)
    # Partition correctness: every row sits in (and was changelogged to) its user's input partition.
    assert all(rows[u][0] == user_part[u] for u in users)
    changelog = consume_all(broker.bootstrap, CHANGELOG, 1.0)
    assert changelog, "no changelog records"
    for r in changelog:
        assert r.partition == user_part[r.key.decode()], (r.key, r.partition)
    assert {r.key.decode() for r in changelog} == set(users)


@pytest.mark.integration
def test_sigkill_mid_replay_and_sigterm_restart(
    broker: EmbeddedBroker, worker_factory: Callable[..., WorkerProc]
) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start(batch_max_events=128)
    w.wait_ready()
    users = [f"k{i}" for i in range(300)]
    n = 6000
    msgs = [event(users[i % 300], i, T0 + i) for i in range(n)]
    expected = collections.Counter(users[i % 300] for i in range(n))
    out = Outputs(broker.bootstrap)
    errors: list[BaseException] = []

    def bg() -> None:
        try:
            produce(broker.bootstrap, msgs)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    try:
        th = threading.Thread(target=bg)
        th.start()
        wait_until(lambda: w.metric("livemb_events_total", outcome="ok") >= 1500, 60, "progress before kill", 0.05)
        assert w.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-replay, no shutdown hooks
        th.join(60)
        assert not errors
        w.start(batch_max_events=128)
        w.wait_ready()
        out.wait_for(dict(expected), 120, w)
        redelivered = w.metric("livemb_events_total", outcome="redelivered")
        applied = w.metric("livemb_events_total", outcome="ok")
        assert w.metric("livemb_events_total", outcome="duplicate") == 0
        print(f"after SIGKILL: applied {applied:.0f} more, skipped {redelivered:.0f} redelivered")

        # Graceful stop, new events while down, restart with the same data dir.
        assert w.stop(signal.SIGTERM) == 0
        counts = table_counts(w)
        assert {u: c for u, (_, c, _) in counts.items()} == dict(expected)
        more = [event(u, "more", T0 + n + 1) for u in users]
        produce(broker.bootstrap, more)
        for u in users:
            expected[u] += 1
        w.start()
        w.wait_ready()
        out.wait_for(dict(expected), 90, w)
        assert w.metric("livemb_events_total", outcome="ok") == len(users)
    finally:
        out.close()
    assert w.stop(signal.SIGTERM) == 0
    assert {u: c for u, (_, c, _) in table_counts(w).items()} == dict(expected)


# ---- metrics/health helpers (no broker) -----------------------------------------------------

@pytest.mark.integration
def test_a_failing_agent_stops_the_worker_and_the_batch_replays(
    broker: EmbeddedBroker, worker_factory: Callable[..., WorkerProc]
) -> None:
    """Faust alone only marks a crashed agent and keeps the process up, consuming nothing. The
    worker exits with EXIT_AGENT_FAILED instead, and the batch it failed on was not acked, so a
    restarted worker applies it (state written once)."""
    from livemb.stream.app import EXIT_AGENT_FAILED

    setup_topics(broker)
    w = worker_factory("fail").start(processor="tests.counting:make_unpublishable")
    w.wait_ready()
    produce(broker.bootstrap, [event("poison", 1, 1_000), event("fine", 2, 1_000)])
    wait_until(lambda: not w.alive(), 60, f"the worker to exit (log tail:\n{w.log_tail()})")
    assert w.proc is not None and w.proc.returncode == EXIT_AGENT_FAILED, w.log_tail()
    assert "the agent failed; the worker exits" in w.log_path.read_text(errors="replace")

    w.start()  # the plain counting processor: the unacked batch is delivered again
    w.wait_ready()
    wait_until(lambda: w.metric("livemb_events_total", outcome="ok") >= 2, 60, "the replayed batch")
    assert w.stop() == 0
    assert {u: c for u, (_, c, _) in table_counts(w).items()} == {"poison": 1, "fine": 1}


def test_latency_summary_from_buckets() -> None:
    m = Metrics()
    assert m.latency_summary()["count"] == 0
    for v in [0.004] * 50 + [0.04] * 49 + [2.5]:
        m.event_to_publish.observe(v)
    s = m.latency_summary()
    assert s["count"] == 100
    assert 0.0 < s["p50_s"] <= 0.005  # half the mass is in the first bucket
    assert 0.03 <= s["p99_s"] <= 0.05
    assert summarize_histogram(m.registry, "livemb_batch_size")["count"] == 0


def test_http_endpoints_and_readiness() -> None:
    import urllib.error
    import urllib.request

    m = Metrics()
    srv = serve(m, 0)
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        assert urllib.request.urlopen(base + "/healthz").status == 200
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(base + "/readyz")
        assert ei.value.code == 503
        m.readiness.set("tables_recovered")
        m.readiness.set("model_loaded")
        assert orjson.loads(urllib.request.urlopen(base + "/readyz").read())["ready"] is True
        m.count({"ok": 3, "invalid": 1})
        m.set_model("hiertcn", "abc", "cpu")
        body = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'livemb_events_total{outcome="ok"} 3.0' in body
        assert 'livemb_model_info{device="cpu",model="hiertcn",version="abc"} 1.0' in body
        assert "livemb_ready 1.0" in body
    finally:
        srv.shutdown()
