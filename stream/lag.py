"""Consumer lag after a batch: how many records each of its partitions still has to deliver.

Feeds `livemb_consumer_lag{partition}` and the idle sweep's "is the worker behind?" test
(stream/sweep.py). Read from the consumer's fetch high-water mark, not ListOffsets, which is low
on the embedded broker (docs/STREAMING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

TP = TypeVar("TP", bound=Hashable)


def partition_lag(consumed: Iterable[tuple[TP, int]], highwater: Callable[[TP], int | None]) -> dict[TP, int]:
    """consumed: (partition, offset) of a batch's records in arrival order (a partition's last one
    counts); highwater: the next offset the broker will write, None before the first fetch (such a
    partition is left out). Records behind, never negative."""
    lag: dict[TP, int] = {}
    for tp, offset in dict(consumed).items():
        hw = highwater(tp)
        if hw is not None:
            lag[tp] = max(0, hw - offset - 1)
    return lag
