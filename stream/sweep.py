"""Idle sessions: close the sessions nobody continues and publish the users' next-session embedding.

A session is idle when its user's last event is more than `session_gap_s` older than the latest
event time seen on the user's partition (event time, not wall clock: a replay behaves like live
traffic, and a stalled partition closes nothing). For each idle user the sweep publishes one
output message (SPEC section 5) whose `embedding` and `next_session_embedding` are the embedding
to use when that user comes back: the model folds the open session into the long-term state
(`SeqModel.next_session_embedding`), exactly what the model does at that user's next event.

Finding idle users without scanning the table: `OpenSessions` keeps, per partition, a min-heap of
(last event ts, user) for users whose session is open, fed from each batch's applied events
(O(log n) per event, lazy deletion of superseded entries); a sweep pops only the entries that
are due, so a tick costs O(due * log n), not O(users). The index is in memory: it is rebuilt
lazily from the traffic after a restart or a rebalance (a user idle across a restart gets no
sweep message; their next event still opens a new session correctly, since the stored state is
not changed by a sweep). Partitions revoked from this worker are dropped from it.

Why the stored state is not rewritten with the folded GRU state: the model folds the open session
when the next session's first event arrives (`cell` in models/hierarchy.py); writing the folded
state here would fold it twice and break live == offline parity. The fold is pure, so publishing
its result is enough. The sweep therefore has nothing to write: it reads rows through the same
`StateStore` and publishes through the same `OutputSink` (and waits for the acks) as a batch, and
runs between batches on the agent's task, so it never interleaves with a batch's commit order.
Outputs are at-least-once, like the batch's.

Behind (a consumer lag of more than one full batch: a backfill, a restart, a burst) the sweep
waits until the worker has caught up, at most `idle_sweep_max_defer_s`: fresh events go first,
and a due user whose next event is in the backlog needs no close message (their entry is
superseded and dropped, as when they come back before the sweep). Users who do not come back
are closed once the worker catches up. Measured on a 60k-event backfill: closing sessions took
~20 % of the worker's time (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from livemb.core.events import ValidEvent
from livemb.core.settings import Settings
from livemb.state.guard import unwrap
from livemb.stream.contracts import OUTPUT_HEADERS
from livemb.stream.metrics import Metrics
from livemb.stream.ports import BatchProcessor, InputRecord, OutputRecord, OutputSink, StateStore

log = logging.getLogger("livemb.sweep")

Partition = tuple[str, int]


@dataclass
class _PartitionIndex:
    clock: int = -(2**62)  # latest event time applied on this partition
    last: dict[str, int] = field(default_factory=dict)  # open session: user -> last event ts
    heap: list[tuple[int, str]] = field(default_factory=list)


class OpenSessions:
    """Per-partition index of users with an open session, ordered by their last event time."""

    def __init__(self) -> None:
        self.parts: dict[Partition, _PartitionIndex] = {}

    def touch(self, part: Partition, user: str, ts: int) -> None:
        p = self.parts.setdefault(part, _PartitionIndex())
        p.clock = max(p.clock, ts)
        prev = p.last.get(user)
        if prev is None or ts > prev:
            p.last[user] = ts
            heapq.heappush(p.heap, (ts, user))

    def due(self, part: Partition, gap_ms: int, limit: int | None = None) -> list[tuple[str, int]]:
        """Pop the users whose last event is more than gap_ms before the partition's clock (at most
        `limit` of them; the rest stay due for the next call)."""
        p = self.parts.get(part)
        if p is None:
            return []
        out: list[tuple[str, int]] = []
        while p.heap and p.clock - p.heap[0][0] > gap_ms and (limit is None or len(out) < limit):
            ts, user = heapq.heappop(p.heap)
            if p.last.get(user) == ts:  # else a newer event superseded this entry
                del p.last[user]
                out.append((user, ts))
        if len(p.heap) > 4 * len(p.last) + 64:  # many superseded entries: compact
            p.heap = [(t, u) for u, t in p.last.items()]
            heapq.heapify(p.heap)
        return out

    def open_count(self) -> int:
        return sum(len(p.last) for p in self.parts.values())

    def forget(self, parts: Sequence[Partition]) -> None:
        for part in parts:
            self.parts.pop(part, None)


class IdleSweep:
    """Run after a batch (stream/app.py): index its applied events, and every `idle_sweep_s`
    publish a next-session message for each idle user. `processor.idle_messages` builds them."""

    def __init__(self, settings: Settings, processor: BatchProcessor, store: StateStore, sink: OutputSink,
                 metrics: Metrics | None = None, clock=time.monotonic) -> None:
        self.settings, self.processor, self.store, self.sink, self.metrics = settings, processor, store, sink, metrics
        self.index = OpenSessions()
        self.anchor: dict[Partition, InputRecord] = {}  # a consumed record per partition, to address rows
        self.gap_ms = int(settings.session_gap_s * 1000)
        self.clock = clock
        self._next = 0.0
        self._last_run = clock()
        self.backlog = False  # the last sweep left due sessions for the next one
        self.enabled = settings.idle_sweep_s > 0

    def observe(self, records: Sequence[InputRecord], applied: Sequence[ValidEvent]) -> None:
        if not self.enabled:
            return
        for r in records:
            self.anchor[(r.topic, r.partition)] = r
        for e in applied:
            self.index.touch((e.topic, e.partition), e.user_id, e.ts)

    def forget(self, parts: Sequence[Partition]) -> None:
        self.index.forget(parts)
        for p in parts:
            self.anchor.pop(p, None)

    async def maybe_run(self, lag: int = 0) -> int:
        """`lag`: the consumer lag of the partitions of the batch just processed (events)."""
        if not self.enabled:
            return 0
        now = self.clock()
        if lag > self.settings.batch_max_events and now - self._last_run < self.settings.idle_sweep_max_defer_s:
            return 0  # behind: fresh events first (the module docstring)
        if now < self._next:
            return 0
        self._next = now + self.settings.idle_sweep_s
        self._last_run = now
        try:
            n = await self.run()
            if self.backlog:  # the per-tick cap was hit: go on after the next batch, not in idle_sweep_s
                self._next = self.clock()
            return n
        except Exception:  # noqa: BLE001 - the sweep is best effort; it must never stop the agent
            log.exception("idle sweep failed; those users get no close message (their state is unaffected)")
            return 0

    async def run(self) -> int:
        """One sweep over every indexed partition; returns the number of messages published."""
        rows: dict[str, bytes] = {}
        last_ts: dict[str, int] = {}
        # Capped per tick: when event time jumps (a backfill hands over to live traffic) thousands of
        # sessions fall due at once, and closing them in one go blocked the agent for seconds.
        budget = self.settings.idle_sweep_max_sessions
        self.backlog = False
        for part in list(self.index.parts):
            at = self.anchor.get(part)
            if at is None:
                continue
            if budget <= 0:
                self.backlog = True
                break
            due = self.index.due(part, self.gap_ms, budget)
            budget -= len(due)
            if budget <= 0:
                self.backlog = True
            for user, ts in due:
                row = self.store.get(user, at)
                if row is None:
                    continue
                guard, inner = unwrap(row, self.settings.dedupe_memory)
                if inner is None or guard.last_ts != ts:  # nothing applied yet / moved on meanwhile
                    continue
                rows[user], last_ts[user] = inner, ts
        if not rows:
            return 0
        t0 = time.perf_counter()
        outputs = self.processor.idle_messages(rows, last_ts)
        if outputs:
            topic = self.settings.topic_out
            await self.sink.publish([OutputRecord(topic, u.encode(), v, OUTPUT_HEADERS) for u, v in outputs])
        if self.metrics is not None:
            self.metrics.outputs.inc(len(outputs))
            self.metrics.sessions_closed.inc(len(outputs))
        log.info("idle sweep: %d sessions closed, %d next-session messages in %.3fs (%d open sessions indexed)",
                 len(rows), len(outputs), time.perf_counter() - t0, self.index.open_count())
        return len(outputs)
