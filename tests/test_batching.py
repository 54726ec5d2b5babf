"""stream.batching.adaptive_batches against a stand-in for a Faust agent's stream that behaves as
Faust 0.15's stream iterator does: it yields to the loop once before each take, then takes from
the channel's queue, waiting when the queue is empty. A rebalance clears that queue and then
waits until every event taken from it is acked (`stream_wait_empty`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from livemb.stream.batching import adaptive_batches


class FakeStream:
    """`noack()`, `channel.queue`, `events()` and `ack()`, the parts adaptive_batches uses."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.channel = self
        self.acked: list[str] = []
        self.before_take: Callable[[], None] | None = None  # runs in the iterator's yield

    def noack(self) -> FakeStream:
        return self

    async def events(self):
        while True:
            await asyncio.sleep(0)  # Faust's iterator yields here before every take
            if self.before_take is not None:
                self.before_take()
            yield self.queue.get_nowait() if not self.queue.empty() else await self.queue.get()

    async def ack(self, ev: str) -> None:
        self.acked.append(ev)


def test_batches_take_what_is_waiting() -> None:
    async def go() -> list[list[str]]:
        s = FakeStream()
        for e in "abc":
            s.queue.put_nowait(e)
        batches = adaptive_batches(s, max_events=2, max_wait_s=1.0)
        first = await anext(batches)
        second = await anext(batches)  # the first is acked when the second is asked for
        assert s.acked == list(first)
        return [list(first), list(second)]

    assert asyncio.run(go()) == [["a", "b"], ["c"]]


def test_a_queue_cleared_while_a_batch_grows_does_not_hold_its_events() -> None:
    """A rebalance clears the queue just as the batch reaches for its second event (the other
    events were fetched before the rebalance and are dropped with the queue). The batch must go
    with the event it holds, so the caller can finish and ack it: a batch that waited on the
    cleared queue would hold its unacked event while the rebalance waits for that ack."""

    async def go() -> tuple[list[str], list[str]]:
        s = FakeStream()
        for e in "abc":
            s.queue.put_nowait(e)
        batches = adaptive_batches(s, max_events=10, max_wait_s=0.2)
        takes = 0

        def rebalance_on_second_take() -> None:
            nonlocal takes
            takes += 1
            if takes == 2:
                while not s.queue.empty():
                    s.queue.get_nowait()

        s.before_take = rebalance_on_second_take
        first = await asyncio.wait_for(anext(batches), 5)
        s.before_take = None
        s.queue.put_nowait("d")  # after the rebalance: a new event
        second = await asyncio.wait_for(anext(batches), 5)
        await batches.aclose()
        return list(first), list(second)

    first, second = asyncio.run(go())
    assert first == ["a"]
    assert second == ["d"]  # the stalled take's event starts the next batch, once it comes


def test_events_beyond_a_full_batch_start_the_next() -> None:
    """Nothing is dropped or repeated across batches, and every batch is acked before the next."""

    async def go() -> list[list[str]]:
        s = FakeStream()
        for e in "abcdefg":
            s.queue.put_nowait(e)
        out = []
        batches = adaptive_batches(s, max_events=3, max_wait_s=1.0)
        for _ in range(3):
            b = await asyncio.wait_for(anext(batches), 5)
            assert s.acked == [e for prev in out for e in prev]
            out.append(list(b))
        await batches.aclose()
        return out

    assert asyncio.run(go()) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]


def test_the_stream_ending_mid_batch_still_yields_the_batch() -> None:
    """The iterator ends (the agent stops) while a batch grows: the events taken are yielded."""

    async def go() -> list[list[str]]:
        s = FakeStream()
        for e in "abc":
            s.queue.put_nowait(e)

        async def two_then_end():
            for _ in range(2):
                await asyncio.sleep(0)
                yield s.queue.get_nowait()

        s.events = two_then_end  # type: ignore[method-assign]
        return [list(b) async for b in adaptive_batches(s, max_events=10, max_wait_s=1.0)]

    assert asyncio.run(go()) == [["a", "b"]]
