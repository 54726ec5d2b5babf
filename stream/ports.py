"""The small interfaces the batch step (stream/batch.py) is given, and the records it passes.

The batch step never sees Faust: the app hands it thin adapters (stream/app.py), the unit tests
in-memory ones (tests/inmemory.py). Everything that crosses these lines is a plain dataclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from livemb.core.events import ValidEvent
from livemb.stream.quality import OnlineQuality

Headers = tuple[tuple[str, bytes], ...]  # Kafka record headers, in order (names may repeat)


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed input message. `handle` is the transport's own object (a Faust event), opaque
    here: the store adapter uses it to address the user's partition, the app to ack it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    handle: Any = field(default=None, compare=False, repr=False)
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = ()  # `recommendations`: stream.contracts.OUTPUT_HEADERS; DLQ: stream.dlq
    partition: int | None = None  # None: the key partitioner; the new-item evidence: 0 (stream/evidence.py)


class StateStore(Protocol):
    """Rows of users, each addressed under the partition of an input record of that user."""

    def get(self, user_id: str, at: InputRecord) -> bytes | None: ...

    def put(self, user_id: str, row: bytes, at: InputRecord) -> None: ...


class OutputSink(Protocol):
    async def publish(self, records: Sequence[OutputRecord]) -> None:
        """Send every record and return only once the broker acknowledged all of them."""
        ...


class InputLog(Protocol):
    """Direct reads of the input topic beside the consumer (stream/gap_repair.py)."""

    async def read(self, topic: str, partition: int, first: int, end: int) -> list[InputRecord]:
        """Input records [first, end) of one partition, read straight from the broker."""
        ...

    async def committed(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The consumer group's committed offset per partition (absent: none committed)."""
        ...

    async def log_id(self, topic: str) -> int | None:
        """An id of the topic's current incarnation (a re-created topic gets another); 0 when the
        broker has no topic ids, None when the lookup failed (the last known id is kept)."""
        ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    version: str
    device: str


@dataclass
class StepResult:
    """What one processor call returns for a batch of applied events."""

    states: dict[str, bytes]  # new state blob per user that had events applied
    outputs: list[tuple[str, bytes]]  # (user_id, message JSON) for `recommendations`, one per user
    rejected: dict[str, str] = field(default_factory=dict)  # user -> why their stored state was refused
    unknown_items: int = 0
    sessions_started: int = 0
    model_step_seconds: float = 0.0
    topk_seconds: float = 0.0
    quality: OnlineQuality | None = None  # the batch's online quality counts (stream/quality.py)
    quality_seconds: float = 0.0
    new_item_evidence: bytes | None = None  # the batch's new-item co-occurrence pairs (stream/evidence.py)


class BatchProcessor(Protocol):
    """The model side of the batch step (stream/processor.py; tests bring their own).

    Threads: every method runs on the worker's event loop, one at a time (`process` is not moved
    to a thread: its many small torch ops would each wait for the GIL, docs/BENCHMARKS.md).
    """

    @property
    def ready(self) -> bool: ...

    def model_info(self) -> ModelInfo | None: ...

    reload_counts: dict[str, int]  # hot swaps by result ("ok" / "refused"), for livemb_model_reloads_total

    def request_reload(self) -> None:
        """Check the model files at the next `maybe_reload` (SIGHUP)."""
        ...

    def maybe_reload(self) -> bool:
        """Swap in new model files if they changed (between batches); True when swapped."""
        ...

    def idle_messages(self, states: dict[str, bytes], last_ts: dict[str, int]) -> list[tuple[str, bytes]]:
        """Next-session messages for users whose session went idle ([] when the model has none)."""
        ...

    def process(self, events: list[ValidEvent], states: dict[str, bytes | None]) -> StepResult:
        """events: the batch's applied events in arrival order; states: each of their users' stored
        blob (None for a new user). A user whose blob cannot be read is returned in `rejected`
        (their events are not applied); every other user gets a new state and one output."""
        ...
