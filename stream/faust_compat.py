"""Everything that touches Faust's or aiokafka's private internals, in one place.

Written against faust-streaming 0.15.3 (mode-streaming 0.7.1) and aiokafka 0.14.0; pyproject.toml
pins `faust-streaming==0.15.*` for that reason. `PRIVATE_API` lists every private name used here
and `missing_private_api()` reports the ones that moved: tests/test_faust_compat.py fails loudly on
an upgrade instead of the worker failing at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiokafka
import faust.streams
from aiokafka.consumer.fetcher import Fetcher
from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables.recovery import Recovery
from faust.tables.table import Table
from faust.transport.consumer import Consumer
from faust.transport.producer import Producer, ProducerBuffer

from livemb.state.guard import keep_newer
from livemb.stream.fetch_wait import FetchWait

log = logging.getLogger("livemb.worker")

TESTED_FAUST = "0.15"

# (owner, attribute) pairs this module relies on; none of them is public API.
PRIVATE_API: tuple[tuple[object, str], ...] = (
    (RocksDBStore, "_db_for_partition"),
    (RocksDBStore, "apply_changelog_batch"),
    (RocksDBStore, "set_persisted_offset"),
    (Table, "_new_store_by_url"),
    (faust.streams, "_current_event"),
    (aiokafka, "AIOKafkaConsumer"),
    (Fetcher, "_proc_fetch_request"),  # and its instance attributes, checked in adapt_fetch_wait
    (Recovery, "_build_highwaters"),
    (Recovery, "_build_offsets"),
    (Recovery, "active_remaining_total"),
    (Recovery, "in_recovery"),
    (Recovery, "_recovery_started_at"),
    (Recovery, "_recovery_ended_at"),
    (Consumer, "_committed_offset"),  # an instance attribute: found by its annotation
    (Consumer, "_read_offset"),  # likewise
    (Producer, "buffer"),  # an instance attribute: found by its annotation (ProducerT)
    (ProducerBuffer, "max_messages"),
)


def _has(owner: object, name: str) -> bool:
    """`owner` has `name`, or (a class) declares it as an instance attribute in an annotation."""
    if hasattr(owner, name):
        return True
    return isinstance(owner, type) and any(name in vars(c).get("__annotations__", {}) for c in owner.__mro__)


def missing_private_api() -> list[str]:
    return [f"{getattr(o, '__name__', o)}.{name}" for o, name in PRIVATE_API if not _has(o, name)]


class GuardedRocksDBStore(RocksDBStore):
    """RocksDB store whose changelog recovery never replaces a row by an older copy.

    Why: Tansu's ListOffsets(latest) is low (docs/STREAMING.md), so Faust may replay a stale slice
    of the changelog onto an intact local store; `state.guard.keep_newer` keeps the row with the
    higher input offset. Overrides `apply_changelog_batch` (0.15.3 signature) and uses the private
    `_db_for_partition`.
    """

    def apply_changelog_batch(
        self, batch: Iterable[Any], to_key: Callable[[Any], Any], to_value: Callable[[Any], Any]
    ) -> None:
        tp_offsets: dict[Any, int] = {}
        for event in batch:
            msg = event.message
            tp_offsets[msg.tp] = max(msg.offset, tp_offsets.get(msg.tp, -1))
            db = self._db_for_partition(msg.partition)
            if msg.value is None:
                db.delete(msg.key)
            else:
                db.put(msg.key, keep_newer(db.get(msg.key), msg.value))
        for tp, offset in tp_offsets.items():
            self.set_persisted_offset(tp, offset)


class GuardedTable(Table):
    """A Faust table backed by `GuardedRocksDBStore`. Faust has no public hook for a custom store
    class, so this overrides the private factory `_new_store_by_url` (0.15.3 arguments)."""

    def _new_store_by_url(self, url: Any) -> Any:
        return GuardedRocksDBStore(
            url, self.app, self, table_name=self.name, key_type=self.key_type,
            key_serializer=self.key_serializer, value_serializer=self.value_serializer,
            value_type=self.value_type, loop=self.loop, options=self.options,
        )  # fmt: skip


@contextlib.contextmanager
def current_event(event: Any) -> Iterator[None]:
    """Make `event` Faust's current event while reading/writing table rows.

    Why: a Faust table picks the RocksDB db and the changelog partition of a row from the current
    event (a private context variable in 0.15.3). Inside `take_events()` it is the batch's last
    event, so each user's row must be addressed under an event of that user's own partition.
    """
    token = faust.streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust.streams._current_event.reset(token)


def tune_fetch_wait(floor_ms: int, cap_ms: int, on_change: Callable[[int], None] | None = None) -> None:
    """Give every aiokafka consumer created afterwards a fetch wait of `floor_ms`, raised towards
    `cap_ms` while the broker returns nothing that it has (stream/fetch_wait.py says when and why).

    Why the floor: faust-streaming 0.15.3 hard-codes fetch_max_wait_ms=1500 with no setting.
    Measured on Tansu, a fetch that finds no data waits that long even when data arrives meanwhile,
    which dominated event-to-publish latency. Faust's driver looks the class up on the module when
    it creates the consumer, so the module attribute is replaced (idempotent: it wraps the original).
    `on_change(ms)`: called when the wait changes (a gauge).
    """
    base = getattr(aiokafka.AIOKafkaConsumer, "_livemb_base", aiokafka.AIOKafkaConsumer)

    class Consumer(base):  # type: ignore[misc, valid-type]
        _livemb_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = floor_ms
            super().__init__(*args, **kwargs)

        async def start(self) -> None:
            await super().start()
            adapt_fetch_wait(self._fetcher, FetchWait(floor_ms, cap_ms), on_change)

    aiokafka.AIOKafkaConsumer = Consumer


async def started_consumer(floor_ms: int, cap_ms: int, **kwargs: Any) -> aiokafka.AIOKafkaConsumer:
    """aiokafka's own consumer (not the class `tune_fetch_wait` installs for Faust), started, with
    the same adaptive fetch wait: for readers outside the worker (the bench's output reader)."""
    base = getattr(aiokafka.AIOKafkaConsumer, "_livemb_base", aiokafka.AIOKafkaConsumer)
    consumer = base(fetch_max_wait_ms=floor_ms, **kwargs)
    try:
        await consumer.start()
        adapt_fetch_wait(consumer._fetcher, FetchWait(floor_ms, cap_ms))
    except BaseException:
        await consumer.stop()  # a consumer that failed to start still holds its client
        raise
    return consumer


def adapt_fetch_wait(fetcher: Fetcher, wait: FetchWait, on_change: Callable[[int], None] | None = None) -> None:
    """Wrap the fetcher's per-request coroutine: after each response, `wait.after_fetch` sets the
    wait of the next request (aiokafka reads `_fetch_max_wait_ms` whenever it builds one).
    A request asks only for partitions with nothing buffered, so a partition found in `_records`
    after the response got records (or an error) from it."""
    for name in ("_fetch_max_wait_ms", "_records"):
        if not hasattr(fetcher, name):
            raise RuntimeError(f"aiokafka's Fetcher has no {name} (pinned for aiokafka 0.14): fetch wait not adaptable")
    inner = fetcher._proc_fetch_request
    fetcher._fetch_max_wait_ms = wait.ms
    peak = wait.ms  # the highest wait so far: logged once per new high

    async def proc_fetch_request(assignment: Any, node_id: int, request: Any) -> bool:
        nonlocal peak
        t0 = time.monotonic()
        woke = await inner(assignment, node_id, request)
        asked = [(aiokafka.TopicPartition(topic, p), offset) for topic, parts in request.topics for p, offset, _ in parts]
        got = any(tp in fetcher._records for tp, _ in asked)
        states = [(assignment.state_value(tp), offset) for tp, offset in asked] if assignment.active else []
        more = any(st is not None and st.highwater is not None and st.highwater > offset for st, offset in states)
        before = fetcher._fetch_max_wait_ms
        now = fetcher._fetch_max_wait_ms = wait.after_fetch(1000 * (time.monotonic() - t0), got, more)
        if now != before and on_change is not None:
            on_change(now)
        if now > peak:  # a new high only: the wait goes up and down as the partition's walk nears it
            peak = now
            log.info("fetch wait raised to %d ms (a new high): the broker returned nothing though it holds records "
                     "past the fetch offset (it stops looking when the wait is up)", now)
        return woke

    fetcher._proc_fetch_request = proc_fetch_request


def widen_producer_buffer(app: Any, max_messages: int) -> None:
    """Each state write queues one changelog message; let a whole batch fit before Faust's
    conductor pauses for the producer buffer (0.15.3 default 100, no setting for it)."""
    app.producer.buffer.max_messages = max(app.producer.buffer.max_messages, max_messages)


# ---------------------------------------------------------------------------- consumer offsets
def committed_offset(app: Any, tp: Any) -> int | None:
    """The group's committed offset of an assigned partition as Faust last knew it (the next offset
    to read: read from the broker when the partition is sought after an assignment, updated after
    each of Faust's commits), without a broker round trip. 0 when the group has none; None while the
    partition is assigned but not yet sought (just after a rebalance Faust has dropped the old value
    and not read the new one: "none" would claim the whole partition is still to process).
    Private `Consumer._committed_offset` and `_read_offset` of 0.15.3 (the seek fills both)."""
    consumer = app.consumer
    if tp not in consumer._read_offset:
        return None
    return consumer._committed_offset.get(tp) or 0


def fetch_highwater(app: Any, tp: Any) -> int | None:
    """The consumer's fetch high-water mark of `tp` (None before its first fetch response, or when
    the partition was revoked meanwhile: aiokafka asserts that it is assigned, and the assignment
    changes on Faust's consumer thread)."""
    try:
        return app.consumer.highwater(tp)
    except AssertionError:
        return None


# ---------------------------------------------------------------------------- changelog recovery
def fetch_end_offsets(new_consumer: Callable[[], Any], reported: dict[tuple[str, int], int],
                      timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """End offsets of partitions from Fetch responses' high-water mark (blocking).

    Why: Tansu's ListOffsets(latest) returns the base offset + 1 of *some* recent batch, lower than
    the true end, while the high-water mark in a fetch response is right (measured: batches
    1,1,5,10,100,3 -> true end 120, ListOffsets 118 or 119, fetch high-water 120). Seeking to the
    reported end and fetching once gives the high-water even when no record follows. On a correct
    broker the two agree, so this costs one fetch per partition at recovery start.
    """
    from kafka import TopicPartition

    consumer = new_consumer()
    try:
        tps = {key: TopicPartition(*key) for key in reported}
        consumer.assign(list(tps.values()))
        for key, tp in tps.items():
            consumer.seek(tp, max(0, reported[key]))
        ends: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(tps) and time.monotonic() < deadline:
            consumer.poll(200, max_records=1)
            for key, tp in tps.items():
                hw = consumer.highwater(tp)
                if hw is not None:
                    ends[key] = max(int(hw), reported[key])
        for key in tps.keys() - ends.keys():
            log.warning("no fetch high-water for changelog %s[%d] in %.0fs; using ListOffsets %d",
                        *key, timeout_s, reported[key])
            ends[key] = reported[key]
        return ends
    finally:
        consumer.close()


def install_exact_recovery(new_consumer: Callable[[], Any]) -> None:
    """Make Faust's table recovery read every changelog partition to its fetch high-water mark.

    Why: Faust 0.15.3 (`Recovery._build_highwaters`) stops recovery at ListOffsets(latest) - 1; on
    Tansu that is too low, so a worker rebuilding a lost data directory missed the last changelog
    batch of each partition. Replaces that private method (active and standby partitions both use
    it) with one that asks `fetch_end_offsets`; `new_consumer()` builds a kafka-python consumer with
    the worker's connection settings. Process-wide and idempotent.
    """

    async def _build_highwaters(self: Recovery, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        reported = await consumer.highwaters(*tps)
        by_key = {(tp.topic, tp.partition): (tp, -1 if v is None else int(v)) for tp, v in reported.items()}
        ends = await asyncio.get_running_loop().run_in_executor(
            None, fetch_end_offsets, new_consumer, {k: v for k, (_, v) in by_key.items()}
        )
        fixed = {tp: ends[k] - 1 for k, (tp, _) in by_key.items()}  # Faust counts to the last offset
        for k, (tp, low) in by_key.items():
            if ends[k] != low:
                log.info("changelog %s[%d]: end offset %d (ListOffsets said %d)", tp.topic, tp.partition, ends[k], low)
        destination.clear()
        destination.update(fixed)

    base_build_offsets = getattr(Recovery._build_offsets, "_livemb_base", Recovery._build_offsets)

    async def _build_offsets(self: Recovery, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await base_build_offsets(self, consumer, tps, destination, title)
        if title == "active":  # start offsets and ends are both known now: what this recovery reads
            self._livemb_to_restore = int(self.active_remaining_total())

    _build_offsets._livemb_base = base_build_offsets  # type: ignore[attr-defined]
    Recovery._build_highwaters = _build_highwaters
    Recovery._build_offsets = _build_offsets


@dataclass(frozen=True)
class RecoveryProgress:
    recovering: bool
    to_restore: int  # changelog records between the start offsets and the ends, current (or last) recovery
    remaining: int
    seconds: float  # duration of the current recovery, or of the last completed one


def recovery_progress(app: Any, now: float) -> RecoveryProgress:
    """Faust's recovery state of the app's active table partitions (private attributes of 0.15.3:
    `_recovery_started_at`/`_recovery_ended_at`; `to_restore` is recorded by `install_exact_recovery`)."""
    rec = app.tables.recovery
    started = getattr(rec, "_recovery_started_at", None)
    ended = getattr(rec, "_recovery_ended_at", None)
    recovering = bool(rec.in_recovery)
    seconds = 0.0 if started is None else ((now if recovering or ended is None else ended) - started)
    remaining = int(rec.active_remaining_total())
    return RecoveryProgress(recovering, max(getattr(rec, "_livemb_to_restore", 0), remaining), remaining, seconds)
