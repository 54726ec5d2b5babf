"""Consumer lag: how many records of each assigned input partition the worker still has to process.

Feeds `livemb_consumer_lag{partition}`, the /healthz stall check (stream/health.py) and the idle
sweep's "is the worker behind?" test (stream/sweep.py). The end of a partition is the consumer's
fetch high-water mark, not ListOffsets, which is low on the embedded broker (docs/STREAMING.md).

`LagTracker` keeps one series per assigned partition, refreshed on the worker's timer (so a stuck
agent shows a growing lag instead of the value of its last batch) and after each batch; a revoked
partition's series is removed at once (a stale copy would double-count after a rebalance):

- processed position: the next offset after the last batch this worker finished on the partition
  since it was assigned; before its first batch, the group's committed offset (0 when the group has
  none: a new group reads from the start, auto_offset_reset=earliest); while the commit is not
  known yet (just after a rebalance, before the partition is sought) the partition has no series:
  0 would stand for "read it all again" and show the whole partition as a false lag spike;
- lag = high-water - processed position, never negative;
- before the partition's first fetch response the high-water mark is unknown: the partition has
  no series (0 would claim "caught up"; ListOffsets is no substitute on the embedded broker).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

TP = TypeVar("TP", bound=Hashable)
Offset = Callable[[TP], int | None]


class _Child(Protocol):
    def set(self, value: float) -> None: ...


class LabelledGauge(Protocol):  # prometheus_client.Gauge with one label
    def labels(self, *values: str) -> _Child: ...
    def remove(self, *values: str) -> None: ...


def partition_lag(consumed: Iterable[tuple[TP, int]], highwater: Offset) -> dict[TP, int]:
    """consumed: (partition, offset) of a batch's records in arrival order (a partition's last one
    counts); highwater: the next offset the broker will write, None before the first fetch (such a
    partition is left out). Records behind, never negative."""
    lag: dict[TP, int] = {}
    for tp, offset in dict(consumed).items():
        hw = highwater(tp)
        if hw is not None:
            lag[tp] = max(0, hw - offset - 1)
    return lag


def partition_label(tp: Sequence[object]) -> str:
    """The `partition` label of a (topic, partition) pair (Faust's TP is a named tuple)."""
    return str(tp[1])


class LagTracker(Generic[TP]):
    """Per-partition lag of the worker's assigned input partitions (the module docstring)."""

    def __init__(self, gauge: LabelledGauge | None = None,
                 label: Callable[[TP], str] = partition_label) -> None:  # type: ignore[assignment]
        self.gauge, self.label = gauge, label
        self.done: dict[TP, int] = {}  # next offset after the last finished batch, per partition
        self.lag: dict[TP, int] = {}  # what is reported now (partitions with a series)

    def batch_done(self, consumed: Iterable[tuple[TP, int]], highwater: Offset) -> dict[TP, int]:
        """After a batch: its partitions' processed positions move on; returns their lag (the
        sweep's test) and reports it."""
        last = dict(consumed)
        self.done.update({tp: off + 1 for tp, off in last.items()})
        lag = partition_lag(last.items(), highwater)
        self._report(lag)
        return lag

    def refresh(self, assigned: Iterable[TP], highwater: Offset, committed: Offset) -> dict[TP, int]:
        """On the timer: the lag of every assigned partition; a partition no longer assigned loses
        its series (even if the revoke hook was missed)."""
        assigned = set(assigned)
        self.forget([tp for tp in (self.lag.keys() | self.done.keys()) if tp not in assigned])
        lag: dict[TP, int] = {}
        for tp in assigned:
            hw = highwater(tp)
            if hw is None:  # no fetch yet: unknown, no series
                continue
            pos = self.done.get(tp)
            if pos is None:
                pos = committed(tp)
            if pos is None:  # commit not read yet: unknown, no series
                continue
            lag[tp] = max(0, hw - pos)
        for tp in self.lag.keys() - lag.keys():  # assigned, but its high-water or commit is unknown again
            self._remove(tp)
        self._report(lag)
        return dict(self.lag)

    def forget(self, revoked: Iterable[TP]) -> None:
        """Revoked partitions: their position and their series go."""
        for tp in revoked:
            self.done.pop(tp, None)
            self._remove(tp)

    def total(self) -> int:
        return sum(self.lag.values())

    def _report(self, lag: dict[TP, int]) -> None:
        self.lag.update(lag)
        if self.gauge is not None:
            for tp, behind in lag.items():
                self.gauge.labels(self.label(tp)).set(behind)

    def _remove(self, tp: TP) -> None:
        if self.lag.pop(tp, None) is not None and self.gauge is not None:
            try:
                self.gauge.remove(self.label(tp))
            except KeyError:  # never set under this label
                pass
