"""The consumer's fetch wait (`fetch_max_wait_ms`), adapted to what the broker needs.

Why: the wait is a latency setting (Tansu holds a fetch that finds nothing for the whole wait, so
the worker asks for 10 ms), but Tansu's memory storage also stops *looking* when the wait is up.
Its fetch walks the partition's record batches, so the walk grows with the partition: measured
here, a 1-partition topic of one-record batches answered a 10 ms fetch with 0 records from 20,000
batches on (50 ms fetches got every record in 20-30 ms). The worker then stopped applying for good
while its lag grew (`livemb soak` at half its max rate, after ~150,000 events).

The rule, applied after each fetch response:
- the broker had records past the fetch offset (its high-water mark says so) and returned none:
  double the wait, up to `cap_ms`;
- records came back: the wait may fall to twice that fetch's round trip, never below `floor_ms`
  and never up (a fetch that waited for data to arrive takes the whole wait: raising on it would
  ratchet the wait up on every quiet partition);
- otherwise (nothing there yet): unchanged.
On a broker that answers as soon as data is there (Kafka), round trips stay far under the floor
and the wait stays at `floor_ms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class FetchWait:
    floor_ms: int
    cap_ms: int
    ms: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.floor_ms <= self.cap_ms:
            raise ValueError(f"fetch wait needs 1 <= floor ({self.floor_ms}) <= cap ({self.cap_ms}) ms")
        self.ms = self.ms or self.floor_ms

    def after_fetch(self, round_trip_ms: float, got_records: bool, broker_had_more: bool) -> int:
        """The wait for the next fetch (also kept in `ms`)."""
        if got_records:
            self.ms = max(self.floor_ms, min(self.ms, math.ceil(2 * round_trip_ms)))
        elif broker_had_more:
            self.ms = min(self.cap_ms, 2 * self.ms)
        return self.ms
