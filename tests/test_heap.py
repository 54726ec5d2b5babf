"""stream.heap: the start-up heap leaves the collector's full scans; a hot swap's leftovers do not stay."""

from __future__ import annotations

import gc
import weakref

from livemb.stream.heap import freeze_startup_objects, refreeze


class Node:
    """A reference cycle with a weak handle, to tell whether the collector freed it."""

    def __init__(self) -> None:
        self.me = self


def test_freeze_moves_live_objects_out_of_the_scanned_generations() -> None:
    keep = [[i] for i in range(10_000)]  # tracked containers alive at "start-up"
    try:
        n = freeze_startup_objects()
        assert n == gc.get_freeze_count() >= len(keep)
        scanned = {id(o) for o in gc.get_objects()}  # get_objects() lists the scanned generations only
        assert not any(id(x) in scanned for x in keep[:100])
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


def test_a_cycle_frozen_then_dropped_is_freed_by_the_refreeze_after_a_swap() -> None:
    old = Node()  # say, part of the model a hot swap replaces
    handle = weakref.ref(old)
    try:
        freeze_startup_objects()
        del old
        gc.collect()
        assert handle() is not None  # frozen: a full collection does not free it
        refreeze()
        assert handle() is None
    finally:
        gc.unfreeze()
