"""stream.health.Liveness (/healthz): unhealthy only when input waits and no batch finishes, or
the event loop stops running the lag timer; healthy while idle, starting or recovering."""

from __future__ import annotations

import urllib.error
import urllib.request

import orjson
import pytest

from livemb.stream.health import Liveness
from livemb.stream.metrics import Metrics, serve


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_idle_without_input_stays_healthy() -> None:
    c = Clock()
    live = Liveness(60, c)
    assert live.problem() is None  # before the first tick (start-up, first recovery)
    for _ in range(10):
        c.t += 30
        live.observe(0, ready=True)
    assert live.problem() is None  # 300 s without a batch, but nothing to do


def test_input_waiting_without_progress_fails_after_stall_s() -> None:
    c = Clock()
    live = Liveness(60, c)
    live.observe(0, True)
    live.progressed()
    c.t += 3600  # an hour idle, then input arrives
    live.observe(5, True)
    assert live.problem() is None  # waiting since now, not since the last batch an hour ago
    c.t += 59
    live.observe(50, True)
    assert live.problem() is None
    c.t += 2
    live.observe(80, True)
    assert live.problem() == "agent stalled: no batch finished for 61 s while 80 input records wait"
    live.progressed()  # a batch finished: healthy again
    assert live.problem() is None
    c.t += 61
    live.observe(80, True)
    assert live.problem() is not None


def test_a_busy_worker_with_a_backlog_is_healthy() -> None:
    c = Clock()
    live = Liveness(60, c)
    for _ in range(100):  # lag always > 0, but batches keep finishing
        c.t += 5
        live.observe(10_000, True)
        live.progressed()
    assert live.problem() is None


def test_not_ready_resets_the_stall_clock() -> None:
    """Recovery or a rebalance with input waiting is /readyz's business, not a hang."""
    c = Clock()
    live = Liveness(60, c)
    for _ in range(10):
        c.t += 30
        live.observe(500, ready=False)
    assert live.problem() is None
    live.observe(500, ready=True)
    c.t += 30
    live.observe(500, ready=True)
    assert live.problem() is None  # waiting counts from becoming ready


def test_blocked_event_loop_fails_after_stall_s() -> None:
    c = Clock()
    live = Liveness(60, c)
    live.observe(0, True)
    c.t += 60
    assert live.problem() is None
    c.t += 1  # no tick for 61 s: the loop does not run the timer
    assert live.problem() == "event loop blocked: the lag timer has not run for 61 s"


def test_zero_turns_the_check_off() -> None:
    c = Clock()
    live = Liveness(0, c)
    live.observe(5, True)
    c.t += 10_000
    assert live.problem() is None


def test_healthz_answers_503_with_the_reason() -> None:
    m = Metrics(stall_s=60)
    c = Clock()
    m.liveness.clock = c
    srv = serve(m, 0)
    url = f"http://127.0.0.1:{srv.server_port}/healthz"
    try:
        m.liveness.observe(3, True)
        assert urllib.request.urlopen(url).status == 200
        c.t += 120
        m.liveness.observe(3, True)
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(url)
        assert ei.value.code == 503
        body = orjson.loads(ei.value.read())
        assert body == {"ok": False, "reason": "agent stalled: no batch finished for 120 s while 3 input records wait"}
    finally:
        srv.shutdown()


def test_process_metrics_are_exported() -> None:
    text = Metrics().render().decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert f"\n{name}" in text, name
