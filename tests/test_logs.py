"""stream.logs.RepeatFilter: an outage's repeated errors read as a few lines, without tracebacks."""

from __future__ import annotations

import logging
import sys

from livemb.stream.logs import RepeatFilter


def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc else None
    return logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, msg, (), info)


def test_repeats_are_held_back_and_counted() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=10, clock=lambda: now[0])
    assert f.filter(record("Unable connect to %s"))
    assert not any(f.filter(record("Unable connect to %s")) for _ in range(50))
    assert f.filter(record("another message"))
    now[0] = 11.0
    r = record("Unable connect to %s")
    assert f.filter(r) and "[50 more like this in the last 11s]" in r.msg


def test_connection_errors_lose_their_traceback_not_their_line() -> None:
    f = RepeatFilter(window_s=10, clock=lambda: 0.0)
    r = record("Error receiving network data", ConnectionResetError(104, "Connection reset by peer"))
    assert f.filter(r) and r.exc_info is None and "ConnectionResetError" in r.msg
    try:
        raise ValueError("a bug")
    except ValueError:
        bug = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    assert f.filter(bug) and bug.exc_info is not None  # anything else keeps its traceback
