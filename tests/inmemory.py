"""In-memory StateStore and OutputSink for driving stream.batch.BatchStep without Faust or a broker.

Both append to one shared journal, so a test can see the order of publishes and state writes.
`fail_after` makes either one raise `Crash` part-way, for crash-injection tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from stream.ports import InputRecord, OutputRecord


class Crash(RuntimeError):
    """An injected crash (the process dies here)."""


class MemoryStore:
    def __init__(self, journal: list[tuple[str, str]], fail_after: int | None = None) -> None:
        self.rows: dict[tuple[int, str], bytes] = {}  # (partition, user) -> row, like per-partition dbs
        self.journal, self.fail_after, self.puts = journal, fail_after, 0

    def get(self, user_id: str, at: InputRecord) -> bytes | None:
        return self.rows.get((at.partition, user_id))

    def put(self, user_id: str, row: bytes, at: InputRecord) -> None:
        if self.fail_after is not None and self.puts >= self.fail_after:
            raise Crash(f"crash before state write #{self.puts + 1}")
        self.puts += 1
        self.rows[(at.partition, user_id)] = row
        self.journal.append(("put", user_id))


class MemorySink:
    def __init__(self, journal: list[tuple[str, str]], fail: bool = False) -> None:
        self.records: list[OutputRecord] = []
        self.journal, self.fail = journal, fail

    async def publish(self, records: Sequence[OutputRecord]) -> None:
        if self.fail:
            raise Crash("crash before the broker acked")
        self.records.extend(records)
        self.journal.extend(("ack", r.topic) for r in records)

    def on(self, topic: str) -> list[OutputRecord]:
        return [r for r in self.records if r.topic == topic]


def record(user: str, item: str, ts: int, offset: int, partition: int = 0, **extra: object) -> InputRecord:
    doc = {"user_id": user, "item_id": item, "ts": ts, **extra}
    return InputRecord("interactions", partition, offset, user.encode(), orjson.dumps(doc))


class MemoryLog:
    """InputLog over an in-memory input log: what the broker holds, and the group's commits."""

    def __init__(self, records: Sequence[InputRecord], committed: dict[int, int] | None = None,
                 log_id: int = 0) -> None:
        self.records, self.committed_offsets, self.reads = list(records), dict(committed or {}), []
        self.id = log_id

    async def log_id(self, topic: str) -> int:
        return self.id

    async def read(self, topic: str, partition: int, first: int, end: int) -> list[InputRecord]:
        self.reads.append((partition, first, end))
        return [r for r in self.records if r.topic == topic and r.partition == partition and first <= r.offset < end]

    async def committed(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        return {p: self.committed_offsets[p] for p in partitions if p in self.committed_offsets}
