"""Broker trouble against the real embedded broker: not there at start-up, and killed + restarted
mid-run. Tansu's memory storage loses every topic, committed offset and changelog on a restart:
what the embedded default promises is that the worker rides it out and applies every event
produced after the restart exactly once (the re-created topic is recognised as a new log), with
the state it held kept. Events produced but not yet consumed when the broker died are gone with it."""

from __future__ import annotations

import collections
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from livemb.stream.broker import EmbeddedBroker, free_port
from tests.conftest import WorkerProc, event, produce, wait_until
from tests.test_worker_integration import Outputs, setup_topics, table_counts

T0 = 1_700_000_000_000


@pytest.fixture
def port_only(tmp_path: Path):
    """A loopback port and an EmbeddedBroker that is NOT started yet (the test starts it)."""
    b = EmbeddedBroker(port=free_port(), data_dir=tmp_path / "tansu")
    try:
        yield b
    finally:
        b.stop()


@pytest.mark.integration
def test_broker_unreachable_at_start_then_up(port_only: EmbeddedBroker, tmp_path: Path) -> None:
    w = WorkerProc(port_only, tmp_path / "w", tmp_path)
    w.start()
    try:
        wait_until(lambda: w.alive() and w.http("/healthz")[0] == 200, 30, "/healthz while the broker is down")
        wait_until(lambda: "unreachable" in w.log_tail(), 30, "the retry log line")
        assert w.http("/readyz")[0] == 503
        port_only.start()
        setup_topics(port_only)
        w.wait_ready(120)
        users = [f"s{i}" for i in range(50)]
        produce(port_only.bootstrap, [event(users[i % 50], i, T0 + i) for i in range(500)])
        out = Outputs(port_only.bootstrap)
        try:
            out.wait_for(dict.fromkeys(users, 10), 60, w)
        finally:
            out.close()
    finally:
        assert w.stop(signal.SIGTERM) == 0
    log = w.log_path.read_text()
    assert "Traceback" not in log and log.count("unreachable") <= 20


@pytest.mark.integration
def test_broker_restart_mid_run_loses_nothing_after_it(broker: EmbeddedBroker,
                                                       worker_factory: Callable[..., WorkerProc]) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start()
    w.wait_ready()
    users = [f"b{i}" for i in range(100)]
    expected = collections.Counter(users[i % 100] for i in range(1000))
    produce(broker.bootstrap, [event(users[i % 100], i, T0 + i) for i in range(1000)])
    out = Outputs(broker.bootstrap)
    try:
        out.wait_for(dict(expected), 60, w)
    finally:
        out.close()
    applied_before = w.metric("livemb_events_total", outcome="ok")

    broker.stop()  # memory storage: every topic, offset and the changelog are gone
    broker.start()  # same port
    setup_topics(broker)  # the operator (or auto-creation) re-creates the topics
    more = [event(users[i % 100], f"after-{i}", T0 + 10_000 + i, event_id=f"after-{i}") for i in range(1000)]
    produce(broker.bootstrap, more)
    expected.update(users[i % 100] for i in range(1000))
    out = Outputs(broker.bootstrap)  # the output topic is new too: only post-restart messages
    try:
        out.wait_for(dict(expected), 120, w)  # counts continue from the kept state: 10 -> 20
    finally:
        out.close()
    assert w.alive()
    assert w.metric("livemb_events_total", outcome="ok") - applied_before == 1000
    assert w.metric("livemb_events_total", outcome="redelivered") == 0
    assert w.stop(signal.SIGTERM) == 0
    assert {u: c for u, (_, c, _) in table_counts(w).items()} == dict(expected)
    log = w.log_path.read_text()
    assert "Traceback" not in log
    print(f"worker log: {len(log.splitlines())} lines over the broker restart")
