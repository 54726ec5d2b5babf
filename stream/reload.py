"""Hot swap of the served files: when to look, what changed, and the triggers.

- `FileWatch`: the mtimes of the checkpoint and the items file, checked at most every
  `reload_check_s`; a changed set is loaded aside by the caller's `load` (`ModelProcessor`,
  stream/processor.py, which swaps the whole `Serving` in one assignment). A set that fails to
  load is refused and not retried until a file changes again; swaps are counted by result.
- `install_sighup`: SIGHUP makes the next check happen at once (otherwise every `reload_check_s`);
- `reload_tick`: called by the worker's 0.25 s timer, so a swap happens (and `livemb_model_info`
  follows) even while no events arrive. The timer runs on the event loop between batches, never
  inside one, so a batch sees either the old or the new model.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from livemb.stream.heap import refreeze
from livemb.stream.metrics import Metrics
from livemb.stream.ports import BatchProcessor

log = logging.getLogger("livemb.worker")
swap_log = logging.getLogger("livemb.processor")  # the swap's own lines keep the logger name they always had
T = TypeVar("T")


class FileWatch:
    """Watches a set of files (the checkpoint and the items file) for a hot swap."""

    def __init__(self, paths: Sequence[str], check_s: float) -> None:
        self.paths, self.check_s = tuple(paths), check_s
        self.stamps = self._stamps()  # of the set being served (read before it is loaded)
        self._next_check = 0.0
        self._refused: tuple[float, ...] | None = None  # stamps of a refused set: not retried
        self.counts = {"ok": 0, "refused": 0}  # livemb_model_reloads_total (reload_tick)

    def _stamps(self) -> tuple[float, ...]:
        return tuple(os.stat(p).st_mtime for p in self.paths)

    def request(self) -> None:
        """The next `poll` checks at once (SIGHUP)."""
        self._next_check = 0.0

    def poll(self, load: Callable[[], T], serving: str) -> T | None:
        """`load()` when a file changed since the served set and the last refused one, at most
        every `check_s`: its result, or None (no change, not yet time, or refused). `serving`
        names what stays served, for the log."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self.check_s
        try:
            stamps = self._stamps()
        except OSError as e:  # e.g. a deploy tool between unlink and rename: look again next time
            swap_log.warning("hot swap check: %s; keeping %s", e, serving)
            return None
        if stamps in (self.stamps, self._refused):
            return None
        try:
            stamps = self._stamps()  # before loading: a file replaced meanwhile is seen next time
            new = load()
        except Exception as e:  # noqa: BLE001 - a bad new file must not stop serving the old one
            self._refused = stamps  # retried only once a file changes again
            self.counts["refused"] += 1
            swap_log.error("hot swap refused, keeping %s: %s", serving, e)
            return None
        self.stamps = stamps
        self.counts["ok"] += 1
        return new


def install_sighup(processor: BatchProcessor) -> None:
    """SIGHUP -> processor.request_reload(). Without a handler SIGHUP would terminate the worker
    (the default action)."""

    def on_hup(_sig: int, _frame: object) -> None:
        log.info("SIGHUP: checking the checkpoint and items files now")
        processor.request_reload()

    signal.signal(signal.SIGHUP, on_hup)


def reload_tick(processor: BatchProcessor, metrics: Metrics) -> None:
    if processor.maybe_reload():
        refreeze()  # the old set's cycles are collected, the new set leaves the full scans (stream/heap.py)
    for result, n in processor.reload_counts.items():
        seen = metrics.registry.get_sample_value("livemb_model_reloads_total", {"result": result}) or 0.0
        if n > seen:  # counters only go up: add what happened since the last tick
            metrics.model_reloads.labels(result).inc(n - seen)
