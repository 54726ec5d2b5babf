"""Keep the worker's log readable while the broker is away.

aiokafka logs an ERROR for every failed connect, metadata refresh and fetch (measured: 184 lines in
5 s of a broker restart). `RepeatFilter` lets each distinct message template through once per
`window_s` and reports how many copies it held back, so an outage reads as a few lines; a
connection error logged with its traceback (kafka-python does) keeps one line and loses the trace.
"""

from __future__ import annotations

import logging
import time

NOISY_LOGGERS = (
    "aiokafka", "aiokafka.conn", "aiokafka.client", "aiokafka.cluster", "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator", "aiokafka.producer.sender", "faust.transport.drivers.aiokafka",
    # kafka-python (gap repair, topic ids, committed offsets, recovery ends)
    "kafka", "kafka.net.transport", "kafka.net.connection", "kafka.net.manager", "kafka.net.selector", "kafka.cluster",
    "kafka.client_async", "kafka.conn", "kafka.consumer.fetcher", "kafka.coordinator", "kafka.coordinator.consumer",
)


class RepeatFilter(logging.Filter):
    def __init__(self, window_s: float = 10.0, clock=time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, template) -> (last shown, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError):  # a dropped connection while the broker is away: a line, not a traceback
            record.msg = f"{record.msg} ({type(exc).__name__}: {exc})"
            record.exc_info, record.exc_text = None, None
        now = self.clock()
        last, held = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.window_s:
            self._seen[key] = (last, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {now - last:.0f}s]"
        self._seen[key] = (now, 0)
        return True


def quiet_repeats(window_s: float = 10.0) -> RepeatFilter:
    f = RepeatFilter(window_s)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(f)
    return f
