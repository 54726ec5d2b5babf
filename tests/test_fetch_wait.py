"""The worker's fetch wait rises while the broker returns nothing that it holds (stream/fetch_wait.py),
so a long-running worker on the embedded broker keeps reading once its partitions hold many batches."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import aiokafka
import orjson
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from livemb.stream import faust_compat
from livemb.stream.broker import EmbeddedBroker
from livemb.stream.fetch_wait import FetchWait


def test_the_wait_doubles_only_while_the_broker_returns_nothing_it_holds() -> None:
    w = FetchWait(floor_ms=10, cap_ms=70)
    assert w.after_fetch(3.0, got_records=False, broker_had_more=False) == 10  # nothing there yet
    assert w.after_fetch(11.0, got_records=False, broker_had_more=True) == 20
    assert w.after_fetch(21.0, got_records=False, broker_had_more=True) == 40
    assert w.after_fetch(41.0, got_records=False, broker_had_more=True) == 70  # capped
    assert w.after_fetch(71.0, got_records=False, broker_had_more=True) == 70


def test_records_bring_the_wait_down_to_twice_their_round_trip_and_never_up() -> None:
    w = FetchWait(floor_ms=10, cap_ms=1000, ms=80)
    assert w.after_fetch(80.0, got_records=True, broker_had_more=False) == 80  # waited for data: not raised
    assert w.after_fetch(15.2, got_records=True, broker_had_more=True) == 31  # ceil(2 x 15.2)
    assert w.after_fetch(1.0, got_records=True, broker_had_more=False) == 10  # the floor
    assert w.ms == 10


def test_a_cap_under_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        FetchWait(floor_ms=20, cap_ms=10)


def _fill_with_one_record_batches(bootstrap: str, topic: str, n: int, start: int) -> None:
    """`n` records, each in a batch of its own (batch_size=1): what a trickle of live clicks leaves."""
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, batch_size=1, acks=1)
    for i in range(start, start + n):
        p.send(topic, partition=0, value=orjson.dumps({"user_id": f"u{i % 97}", "item_id": i, "ts": i}))
    p.flush()
    p.close()


async def _started(cls: Callable[..., aiokafka.AIOKafkaConsumer], bootstrap: str) -> aiokafka.AIOKafkaConsumer:
    c = cls(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    return c


async def _read_tail(start: Callable[[], Awaitable[aiokafka.AIOKafkaConsumer]], topic: str, offset: int, want: int,
                     seconds: float) -> tuple[int, int]:
    """(records the consumer `start()` gives read from `offset` within `seconds`, its fetch wait at the end)."""
    c = await start()
    try:
        tp = aiokafka.TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, offset)
        got, deadline = 0, time.monotonic() + seconds
        while got < want and time.monotonic() < deadline:
            got += sum(len(v) for v in (await c.getmany(tp, timeout_ms=200)).values())
        return got, c._fetcher._fetch_max_wait_ms
    finally:
        await c.stop()


def test_a_consumer_keeps_reading_a_partition_too_long_for_a_10_ms_fetch(broker: EmbeddedBroker) -> None:
    """Tansu stops looking when the fetch wait is up and its look grows with the partition's
    batches: a plain 10 ms consumer reads nothing from the tail, the worker's consumer raises its
    wait and reads it all."""
    topic, tail = "fetch-wait", 300
    KafkaAdminClient(bootstrap_servers=broker.bootstrap).create_topics([NewTopic(topic, 1, 1)])
    installed = aiokafka.AIOKafkaConsumer
    plain = getattr(installed, "_livemb_base", installed)  # aiokafka's own, whatever a test installed
    ten_ms = functools.partial(plain, fetch_max_wait_ms=10)
    n = 0
    while True:  # grow the partition until a plain 10 ms fetch comes back empty
        _fill_with_one_record_batches(broker.bootstrap, topic, 10_000, n)
        n += 10_000
        read, _ = asyncio.run(_read_tail(lambda: _started(ten_ms, broker.bootstrap), topic, n - tail, tail, 2.0))
        if read == 0:
            break
        if n >= 80_000:
            pytest.skip(f"this broker answered 10 ms fetches from {n} one-record batches: the defect did not show")
    try:
        faust_compat.tune_fetch_wait(10, 1000)  # what the worker installs
        got, wait_ms = asyncio.run(_read_tail(lambda: _started(aiokafka.AIOKafkaConsumer, broker.bootstrap), topic,
                                              n - tail, tail, 10.0))
    finally:
        aiokafka.AIOKafkaConsumer = installed
    assert got == tail, f"read {got} of the last {tail} records of {n}"
    assert 10 < wait_ms <= 1000

    # the bench's output reader builds its consumer with started_consumer
    read, _ = asyncio.run(_read_tail(lambda: faust_compat.started_consumer(
        5, 1000, bootstrap_servers=broker.bootstrap, enable_auto_commit=False), topic, n - tail, tail, 10.0))
    assert read == tail
