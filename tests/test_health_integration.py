"""A stalled agent on the real embedded broker: `livemb_consumer_lag` grows on /metrics while no
batch finishes, and /healthz turns 503 with the reason; the same worker idle with no input stays
healthy. The stall is the test-only setting `debug_stall_after_batches` (the agent hangs on an
await after N batches, as one waiting for an ack that never comes; the event loop, the timers and
the HTTP thread keep running)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import orjson
import pytest

from livemb.stream.broker import EmbeddedBroker
from tests.conftest import WorkerProc, event, produce, wait_until
from tests.test_worker_integration import setup_topics

T0 = 1_700_000_000_000
STALL_S = 3  # healthz_stall_s of the test worker


def lag_series(w: WorkerProc) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, body = w.http("/metrics")
    return {s.labels["partition"]: s.value for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples if s.name == "livemb_consumer_lag"}


@pytest.mark.integration
def test_stalled_agent_shows_growing_lag_and_fails_healthz(broker: EmbeddedBroker,
                                                           worker_factory: Callable[..., WorkerProc]) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start(env={"LIVEMB_DEBUG_STALL_AFTER_BATCHES": "1", "LIVEMB_HEALTHZ_STALL_S": str(STALL_S)})
    try:
        w.wait_ready()
        produce(broker.bootstrap, [event("first", 0, T0)])  # batch 1: processed
        wait_until(lambda: w.metric("livemb_events_total", outcome="ok") == 1, 60, "the first batch")
        wait_until(lambda: lag_series(w) == dict.fromkeys("0123", 0.0), 15,
                   f"a zero lag series for each of the 4 assigned partitions ({lag_series(w)})")
        idle = []
        for _ in range(int(2 * STALL_S / 0.5)):  # idle, nothing to do, for twice the stall limit: healthy
            idle.append(w.http("/healthz"))
            time.sleep(0.5)
        assert {c for c, _ in idle} == {200}, idle

        sent, seen = 1, []
        for _ in range(3):  # batch 2 hangs: everything from now on stays unprocessed
            produce(broker.bootstrap, [event(f"u{i % 10}", sent + i, T0 + sent + i) for i in range(20)])
            sent += 20
            want = sent - 1
            total = wait_until(lambda want=want: (t := sum(lag_series(w).values())) == want and t, 15,
                               f"lag {want} on /metrics (now {lag_series(w)})")
            seen.append((total, lag_series(w)))
        print(f"\nlag after each round of 20 stalled events: {seen}")
        assert [t for t, _ in seen] == [20.0, 40.0, 60.0]
        assert w.metric("livemb_events_total", outcome="ok") == 1  # nothing else was processed

        code, body = wait_until(lambda: (r := w.http("/healthz"))[0] == 503 and r, STALL_S + 10,
                                "/healthz 503 on the stalled agent")
        reason = orjson.loads(body)
        print(f"/healthz idle: {idle[-1]}; stalled: {code} {reason}")
        assert reason["ok"] is False and reason["reason"].startswith("agent stalled: no batch finished for ")
        assert reason["reason"].endswith("while 60 input records wait")
        assert w.http("/readyz")[0] == 200  # ready, just not getting anywhere
        assert w.metric("process_resident_memory_bytes") > 0 and w.metric("process_open_fds") > 0
        assert "debug_stall_after_batches=1: the agent hangs here" in w.log_path.read_text(errors="replace")
    finally:
        w.stop(signal.SIGKILL, timeout=10)


@pytest.mark.integration
def test_after_a_rebalance_each_partition_has_one_lag_series(broker: EmbeddedBroker,
                                                            worker_factory: Callable[..., WorkerProc]) -> None:
    """A second worker joins: the first one's revoked partitions lose their series (they used to
    stay at their last value on both workers, double-counting the summed lag)."""
    setup_topics(broker)
    a, b = worker_factory("a"), worker_factory("b")
    try:
        a.start()
        a.wait_ready()
        produce(broker.bootstrap, [event(f"u{i}", i, T0 + i) for i in range(40)])
        wait_until(lambda: a.metric("livemb_events_total", outcome="ok") == 40, 60, "a applied every event")
        wait_until(lambda: set(lag_series(a)) == set("0123"), 15, f"a reports 4 partitions ({lag_series(a)})")
        b.start()
        b.wait_ready()

        def split() -> bool:
            la, lb = set(lag_series(a)), set(lag_series(b))
            return bool(la) and bool(lb) and not la & lb and la | lb == set("0123")

        wait_until(split, 60, "each partition reported by exactly one worker")
        got = (lag_series(a), lag_series(b))
        print(f"\nlag series after the rebalance: a {got[0]}, b {got[1]}")
        assert sum(got[0].values()) + sum(got[1].values()) == 0
        produce(broker.bootstrap, [event(f"u{i}", i, T0 + 100 + i) for i in range(40)])  # both keep working
        wait_until(lambda: a.metric("livemb_events_total", outcome="ok") + b.metric("livemb_events_total",
                                                                                   outcome="ok") == 80,
                   60, "the 40 new events applied by the two workers")
        assert split(), (lag_series(a), lag_series(b))
    finally:
        b.stop(signal.SIGKILL, timeout=10)
        a.stop(signal.SIGKILL, timeout=10)
