"""Re-reads input offsets that Faust's consumer skipped, so they are not lost for state.

Measured with faust-streaming 0.15.3 on a restart with a backlog: the agent received offsets
..., 415, 418, ... of a partition; 416-417 were dropped inside Faust's consumer and its commit
moved past them (docs/STREAMING.md). `OffsetContinuity` (state/guard.py) detects such a hole; this
module fetches the missing records straight from the broker with a plain kafka-python consumer
(no group, assign + seek) and hands them back as event-like objects, which the agent applies
before the rest of the batch. The per-user offset guard makes this idempotent: a record that was
in fact applied before is skipped as redelivered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("livemb.worker")


@dataclass(frozen=True)
class RepairedMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    tp: Any


@dataclass(frozen=True)
class RepairedEvent:
    """Quacks like a Faust event for validation; it is never acked (its offset is below the
    committed one already) and its table write runs under a real event of the same partition."""

    message: RepairedMessage


class GapRepair:
    def __init__(self, bootstrap: str, timeout_s: float = 10.0):
        self.bootstrap, self.timeout_s = bootstrap, timeout_s
        self._consumer = None

    def _client(self):
        if self._consumer is None:
            from kafka import KafkaConsumer

            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                           enable_auto_commit=False)
        return self._consumer

    def fetch(self, tp: Any, first: int, end: int) -> list[RepairedEvent]:
        """Records [first, end) of tp (a Faust TP with .topic/.partition). Blocking; run it in an executor."""
        from kafka import TopicPartition

        c = self._client()
        ktp = TopicPartition(tp.topic, tp.partition)
        c.assign([ktp])
        c.seek(ktp, first)
        got: dict[int, RepairedEvent] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < end - first and time.monotonic() < deadline:
            for rec in c.poll(200, max_records=max(1, end - first)).get(ktp, []):
                if first <= rec.offset < end:
                    got[rec.offset] = RepairedEvent(RepairedMessage(tp.topic, tp.partition, rec.offset, rec.key,
                                                                    rec.value, tp))
        if len(got) < end - first:
            log.error("gap repair of %s got %d of %d records [%d, %d)", tp, len(got), end - first, first, end)
        return [got[o] for o in sorted(got)]

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
