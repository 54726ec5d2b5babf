"""Input offsets Faust's consumer skipped: detect the hole, re-read it from the broker.

Measured with faust-streaming 0.15.3 on a restart with a backlog: the agent received offsets
..., 415, 418, ... of a partition; 416-417 were dropped inside Faust's consumer and its commit
moved past them (docs/STREAMING.md). `OffsetContinuity` detects such a hole; `GapRepair` fetches
the missing records straight from the broker with a plain kafka-python consumer (no group,
assign + seek), and the batch step applies them before the rest of the batch. The per-user offset
guard makes this idempotent: a record that was in fact applied before is skipped as redelivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from livemb.stream.ports import InputRecord

log = logging.getLogger("livemb.worker")


class Hole(NamedTuple):
    tp: Any  # (topic, partition)
    first: int  # the first missing offset
    end: int  # the next offset seen (exclusive end of the hole)
    at: int  # index, in the observed items, of the record at `end`


class OffsetContinuity:
    """Detects input offsets that were never delivered to the agent (a hole in a partition).

    Partitions are keyed by (topic, partition). The offset guard cannot see a hole (it only judges
    what arrives); this detector makes it visible, and `GapRepair` fills it.
    """

    def __init__(self) -> None:
        self.expected: dict[Any, int] = {}

    def forget(self, tps: Iterable[Any]) -> None:
        for tp in tps:
            self.expected.pop(tp, None)

    def unseen(self, tps: Iterable[Any]) -> list[Any]:
        """Partitions with no expected offset yet (new since the assignment)."""
        return [tp for tp in dict.fromkeys(tps) if tp not in self.expected]

    def seed(self, tp: Any, committed: int) -> None:
        """Expect `committed` (the group's committed offset: the next one to consume) as the first
        offset of a newly assigned partition, so a hole in its very first records is seen too."""
        self.expected.setdefault(tp, committed)

    def observe(self, items: Sequence[tuple[Any, int]]) -> list[Hole]:
        """items: (tp, offset) in arrival order. Returns the holes, each with the index of the item
        that revealed it: the missing records belong right before that item."""
        holes: list[Hole] = []
        for at, (tp, off) in enumerate(items):
            exp = self.expected.get(tp)
            if exp is not None and off > exp:
                holes.append(Hole(tp, exp, off, at))
            if exp is None or off >= exp:
                self.expected[tp] = off + 1
        return holes


class GapRepair:
    """InputLog over a plain kafka-python consumer (blocking reads run in an executor thread)."""

    def __init__(self, bootstrap: str, group_id: str | None = None, timeout_s: float = 10.0,
                 security: dict | None = None):
        self.bootstrap, self.group_id, self.timeout_s = bootstrap, group_id, timeout_s
        self.security = security or {}  # TLS/SASL kwargs (stream/security.py)
        self._consumer = None
        self._group_client = None
        self._admin = None

    async def committed(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        return await asyncio.get_running_loop().run_in_executor(None, self.fetch_committed, topic, partitions)

    async def log_id(self, topic: str) -> int | None:
        return await asyncio.get_running_loop().run_in_executor(None, self.fetch_log_id, topic)

    def fetch_log_id(self, topic: str) -> int | None:
        """A 32-bit hash of the topic's UUID (Metadata v10+; Tansu and Kafka >= 2.8 have them). Blocking."""
        from kafka import KafkaAdminClient

        if self._admin is None:
            self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="livemb-log-id", **self.security)
        try:
            [desc] = self._admin.describe_topics([topic])
        except Exception as e:  # noqa: BLE001 - a failed lookup must not look like a new incarnation
            log.warning("topic id of %s unavailable (%s); keeping the last known one", topic, e)
            return None
        topic_id = str(desc.get("topic_id") or "")
        if not topic_id.strip("0-"):
            return 0  # a broker without topic ids: incarnations cannot be told apart
        # Hash the whole UUID: Tansu's are UUIDv7, whose leading bits are a timestamp.
        return int.from_bytes(hashlib.blake2b(topic_id.encode(), digest_size=4).digest(), "little") or 1

    def fetch_committed(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The group's committed offsets (OffsetFetch; this client never joins the group). Blocking."""
        from kafka import KafkaConsumer, TopicPartition

        if self.group_id is None:
            return {}
        if self._group_client is None:
            self._group_client = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.group_id,
                                               enable_auto_commit=False, **self.security)
        out = {}
        for p in partitions:
            off = self._group_client.committed(TopicPartition(topic, p))
            if off is not None:
                out[p] = int(off)
        return out

    def _client(self):
        if self._consumer is None:
            from kafka import KafkaConsumer

            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                           enable_auto_commit=False, **self.security)
        return self._consumer

    async def read(self, topic: str, partition: int, first: int, end: int) -> list[InputRecord]:
        return await asyncio.get_running_loop().run_in_executor(None, self.fetch, topic, partition, first, end)

    def fetch(self, topic: str, partition: int, first: int, end: int) -> list[InputRecord]:
        """Records [first, end) of one partition. Blocking."""
        from kafka import TopicPartition

        c = self._client()
        ktp = TopicPartition(topic, partition)
        c.assign([ktp])
        c.seek(ktp, first)
        got: dict[int, InputRecord] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < end - first and time.monotonic() < deadline:
            for rec in c.poll(200, max_records=max(1, end - first)).get(ktp, []):
                if first <= rec.offset < end:
                    got[rec.offset] = InputRecord(topic, partition, rec.offset, rec.key, rec.value,
                                                  headers=tuple(rec.headers or ()))
        if len(got) < end - first:
            log.error("gap repair of %s[%d] got %d of %d records [%d, %d)", topic, partition, len(got), end - first,
                      first, end)
        return [got[o] for o in sorted(got)]

    def close(self) -> None:
        for c in (self._consumer, self._group_client, self._admin):
            if c is not None:
                c.close()
