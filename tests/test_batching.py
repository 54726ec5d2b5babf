"""stream.batching.adaptive_batches against a stand-in for a Faust agent's stream that behaves as
Faust 0.15's stream iterator does: it yields to the loop once before each take, then takes from
the channel's queue, waiting when the queue is empty."""

from __future__ import annotations

import asyncio

from livemb.stream.batching import adaptive_batches


class FakeStream:
    """`noack()`, `channel.queue`, `events()` and `ack()`, the parts adaptive_batches uses."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.channel = self
        self.acked: list[str] = []

    def noack(self) -> FakeStream:
        return self

    async def events(self):
        while True:
            await asyncio.sleep(0)  # Faust's iterator yields here before every take
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
