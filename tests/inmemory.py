"""In-memory StateStore and OutputSink for driving stream.batch.BatchStep without Faust or a broker.

Both append to one shared journal, so a test can see the order of publishes and state writes.
Crash injection is keyed by the batch step's own step names (`stream.batch.Step`): `CrashAt(step)`
crashes once that step has finished (`CrashingStep`), `CrashAt(step, part=n)` inside it, after n of
its records were sent (PUBLISH, by the sink) or n rows were put (WRITE, by the store).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from livemb.stream.batch import BatchStep, Step
from livemb.stream.ports import InputRecord, OutputRecord


class Crash(RuntimeError):
    """An injected crash (the process dies here)."""


@dataclass(frozen=True)
class CrashAt:
    """Where a worker dies: once `step` has finished (part None), or part-way through it, after
    `part` of its records went through (only PUBLISH and WRITE go through records one by one)."""

    step: Step
    part: int | None = None

    def __post_init__(self) -> None:
        if self.part is not None and self.step not in (Step.PUBLISH, Step.WRITE):
            raise ValueError(f"step {self.step} has no records to crash part-way through")

    def __str__(self) -> str:  # the pytest id
        return f"{self.step}" + ("" if self.part is None else f"-after-{self.part}")

    def inside(self, step: Step, done: int) -> None:
        if step is self.step and self.part is not None and done >= self.part:
            raise Crash(f"crash in step {step} after {done} of its records")

    def after(self, step: Step) -> None:
        if step is self.step and self.part is None:
            raise Crash(f"crash after step {step}")


class CrashingStep(BatchStep):
    """A BatchStep that dies between two steps (`CrashAt(step)` with no part)."""

    def __init__(self, *args: object, crash: CrashAt, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.crash = crash

    def finished(self, step: Step, marks: list[float]) -> None:
        super().finished(step, marks)
        self.crash.after(step)


class MemoryStore:
    def __init__(self, journal: list[tuple[str, str]]) -> None:
        self.rows: dict[tuple[int, str], bytes] = {}  # (partition, user) -> row, like per-partition dbs
        self.journal, self.puts = journal, 0
        self.crash: CrashAt | None = None
        self.armed_at = 0  # puts before the crash was armed: part counts the rows put since

    def arm(self, crash: CrashAt | None) -> None:
        self.crash, self.armed_at = crash, self.puts

    def get(self, user_id: str, at: InputRecord) -> bytes | None:
        return self.rows.get((at.partition, user_id))

    def put(self, user_id: str, row: bytes, at: InputRecord) -> None:
        if self.crash is not None:
            self.crash.inside(Step.WRITE, self.puts - self.armed_at)
        self.puts += 1
        self.rows[(at.partition, user_id)] = row
        self.journal.append(("put", user_id))


class MemorySink:
    """Records are sent one by one; the broker keeps what was sent before a crash."""

    def __init__(self, journal: list[tuple[str, str]], crash: CrashAt | None = None) -> None:
        self.records: list[OutputRecord] = []
        self.journal, self.crash = journal, crash

    async def publish(self, records: Sequence[OutputRecord]) -> None:
        for i, r in enumerate(records):
            if self.crash is not None:
                self.crash.inside(Step.PUBLISH, i)
            self.records.append(r)
            self.journal.append(("ack", r.topic))

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
