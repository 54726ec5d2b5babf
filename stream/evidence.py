"""The new-item evidence topic: every worker's co-occurrence pairs, read in full by every worker.

Each batch's pairs of a new item with a known item (models/newvectors.state_pairs) go out as one
record on `new_item_topic` (ONE partition: one order for every reader), encoded by ids, not by
vectors or table indices, so a reader maps them with its own item table:

    {"k": [new-item key, ...], "n": [new item id, ...], "i": [known item id, ...]}   (orjson)

Every worker reads the topic from its beginning, outside any consumer group (`EvidenceReader`),
and folds only what it reads (`ModelProcessor.apply_evidence`), in offset order: the same
records in the same order give every worker the same fixed-point sums, the same LRU evictions and
so the same explore extension; a restarted worker rebuilds it by reading the topic again (bounded
by the topic's retention and by `new_item_cap`). A record is published with the batch's outputs,
before the input offsets are committed: a batch replayed after a crash publishes its pairs again
(at least once, as the outputs).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import orjson
from kafka import TopicPartition

from livemb.core.settings import Settings

log = logging.getLogger("livemb.evidence")
POLL_RECORDS = 500  # records folded per poll (the poll runs on the event loop, between batches)


def encode(keys: np.ndarray, new_ids: list[str], known_ids: list[str]) -> bytes:
    return orjson.dumps({"k": [int(k) for k in keys], "n": new_ids, "i": known_ids})


def decode(value: bytes) -> tuple[np.ndarray, list[str], list[str]]:
    """(keys, new item ids, known item ids); a malformed record reads as no pairs (logged)."""
    try:
        d = orjson.loads(value)
        keys, new, known = np.asarray(d["k"], np.int64), [str(x) for x in d["n"]], [str(x) for x in d["i"]]
        if not (len(keys) == len(new) == len(known)):
            raise ValueError("lengths differ")
        return keys, new, known
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        log.warning("new-item evidence record unreadable, skipped: %r", e)
        return np.zeros(0, np.int64), [], []


class EvidenceSink(Protocol):
    generation: int  # changes when the sink started over (an item-table swap): read again from the start

    def apply_evidence(self, *values: bytes) -> int: ...


class EvidenceReader:
    """Reads `new_item_topic` partition 0 from the beginning, with a kafka-python consumer outside
    any group, and hands each record to the sink in offset order. `poll` never waits."""

    def __init__(self, settings: Settings, sink: EvidenceSink, consumer_factory, metrics: Any = None):
        self.topic, self.sink, self.metrics = settings.new_item_topic, sink, metrics
        self._factory = consumer_factory
        self._consumer = None
        self._generation = None
        self.records = 0

    def poll(self) -> int:
        if self._consumer is None:
            self._consumer = self._factory()
            self._consumer.assign([TopicPartition(self.topic, 0)])
        if self._generation != self.sink.generation:  # first poll, or the sink started over
            self._consumer.seek_to_beginning()
            self._generation = self.sink.generation
            log.info("reading new-item evidence from the start of %s", self.topic)
        batch = self._consumer.poll(timeout_ms=0, max_records=POLL_RECORDS)
        records = sorted((r for rs in batch.values() for r in rs), key=lambda r: r.offset)
        pairs = self.sink.apply_evidence(*(r.value for r in records)) if records else 0
        self.records += len(records)
        if self.metrics is not None:
            self.metrics.new_item_evidence.inc(pairs)
            self.metrics.new_items_indexed.set(self.sink.indexed)
        return pairs

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
