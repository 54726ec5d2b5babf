"""The worker's long-lived heap, out of the cyclic garbage collector's full scans.

CPython's full (generation 2) collection walks every tracked container object. A worker holds
~283,000 of them from start-up on (torch, Faust, aiokafka, the model and the item table), and in
`livemb bench`'s worker each full collection paused the event loop 125-160 ms: every click that
arrived meanwhile waited for it (docs/BENCHMARKS.md "Garbage-collector pauses"). `gc.freeze()` moves
every object alive at that point into the permanent generation, which collections never walk, so
later collections see only what the worker created since (0.3-67 ms measured).

Frozen objects are still freed by reference counting; only a reference cycle among them that
becomes garbage later would stay. The one event that leaves many start-up objects behind is a hot
swap of the model and items, so `refreeze` thaws, collects and freezes again after each swap (one
full collection per swap, the 125-160 ms it always cost).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then freeze what is left; call when start-up is over (the agent's start).
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's full scans", n)
    return n


def refreeze() -> int:
    """After a hot swap: what the old model and items left in cycles is collected, the new set frozen."""
    gc.unfreeze()
    return freeze_startup_objects()
