"""/healthz: is the worker alive AND getting work done? (`/readyz` is stream/metrics.Readiness.)

`Liveness` is fed on the event loop (the lag timer calls `observe` every second with the summed
`livemb_consumer_lag` of the assigned partitions; each finished batch calls `progressed`) and read
by the HTTP thread. /healthz is unhealthy (`problem()` returns the reason) when, for longer than
`stall_s` (the `healthz_stall_s` setting):

- input waits (lag > 0) while the worker is ready, and no batch has finished since the input
  started waiting (or since the last finished batch, whichever is later): the agent is hung;
- or the lag timer has not run at all (after having run once): the event loop itself is blocked
  (a synchronous call that never returns), which also stops the consumer's heartbeats.

Healthy otherwise: idle with no input waiting, starting up (the timer runs once Faust's first
table recovery is done), recovering or rebalancing (not ready: `/readyz` and the LivembNotReady /
LivembRecoveryStuck alerts cover those; a restart would only start recovery over).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Liveness:
    def __init__(self, stall_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        """stall_s <= 0 turns the check off (always healthy)."""
        self.stall_s, self.clock = stall_s, clock
        self._lock = threading.Lock()
        self._tick: float | None = None  # last observe()
        self._progress: float | None = None  # last finished batch
        self._waiting_since: float | None = None  # input waiting (and ready) without a break since then
        self._waiting = 0

    def progressed(self) -> None:
        """A batch finished (its outputs published and its state written)."""
        with self._lock:
            self._progress = self.clock()

    def observe(self, waiting: int, ready: bool) -> None:
        """From the lag timer: `waiting` input records on the assigned partitions; `ready`: /readyz."""
        with self._lock:
            now = self.clock()
            self._tick = now
            if waiting > 0 and ready:
                self._waiting = waiting
                if self._waiting_since is None:
                    self._waiting_since = now
            else:
                self._waiting, self._waiting_since = 0, None

    def problem(self) -> str | None:
        """Why /healthz fails, or None when healthy."""
        if self.stall_s <= 0:
            return None
        with self._lock:
            now = self.clock()
            if self._tick is not None and now - self._tick > self.stall_s:
                return f"event loop blocked: the lag timer has not run for {now - self._tick:.0f} s"
            if self._waiting_since is not None:
                since = max(self._waiting_since, self._progress if self._progress is not None else self._waiting_since)
                if now - since > self.stall_s:
                    return (f"agent stalled: no batch finished for {now - since:.0f} s "
                            f"while {self._waiting} input records wait")
        return None
