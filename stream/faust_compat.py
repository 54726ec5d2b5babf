"""Everything that touches Faust's or aiokafka's private internals, in one place.

Written against faust-streaming 0.15.3 (mode-streaming 0.7.1) and aiokafka 0.14.0; pyproject.toml
pins `faust-streaming==0.15.*` for that reason. `PRIVATE_API` lists every private name used here
and `missing_private_api()` reports the ones that moved: tests/test_faust_compat.py fails loudly on
an upgrade instead of the worker failing at run time.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aiokafka
import faust.streams
from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables.table import Table

from state.guard import keep_newer

TESTED_FAUST = "0.15"

# (owner, attribute) pairs this module relies on; none of them is public API.
PRIVATE_API: tuple[tuple[object, str], ...] = (
    (RocksDBStore, "_db_for_partition"),
    (RocksDBStore, "apply_changelog_batch"),
    (RocksDBStore, "set_persisted_offset"),
    (Table, "_new_store_by_url"),
    (faust.streams, "_current_event"),
    (aiokafka, "AIOKafkaConsumer"),
)


def missing_private_api() -> list[str]:
    return [f"{getattr(o, '__name__', o)}.{name}" for o, name in PRIVATE_API if not hasattr(o, name)]


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


def tune_fetch_wait(ms: int) -> None:
    """Give every aiokafka consumer created afterwards `fetch_max_wait_ms=ms`.

    Why: faust-streaming 0.15.3 hard-codes fetch_max_wait_ms=1500 with no setting. Measured on
    Tansu, a fetch that finds no data waits that long even when data arrives meanwhile, which
    dominated event-to-publish latency. Faust's driver looks the class up on the module when it
    creates the consumer, so the module attribute is replaced (idempotent: it wraps the original).
    """
    base = getattr(aiokafka.AIOKafkaConsumer, "_livemb_base", aiokafka.AIOKafkaConsumer)

    class Consumer(base):  # type: ignore[misc, valid-type]
        _livemb_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = ms
            super().__init__(*args, **kwargs)

    aiokafka.AIOKafkaConsumer = Consumer


def widen_producer_buffer(app: Any, max_messages: int) -> None:
    """Each state write queues one changelog message; let a whole batch fit before Faust's
    conductor pauses for the producer buffer (0.15.3 default 100, no setting for it)."""
    app.producer.buffer.max_messages = max(app.producer.buffer.max_messages, max_messages)
