"""stream.lag.partition_lag: records behind per partition after a batch, from the fetch high-water."""

from stream.lag import partition_lag


def test_lag_is_per_partition_from_its_last_consumed_offset() -> None:
    highwater = {("in", 0): 10, ("in", 1): 5, ("in", 2): None}.get
    consumed = [(("in", 0), 3), (("in", 1), 4), (("in", 0), 7), (("in", 2), 1)]
    # p0: offsets 8, 9 still to come; p1: caught up; p2: no high-water yet, left out
    assert partition_lag(consumed, highwater) == {("in", 0): 2, ("in", 1): 0}


def test_lag_is_never_negative_and_empty_for_an_empty_batch() -> None:
    assert partition_lag([(("in", 0), 12)], {("in", 0): 10}.get) == {("in", 0): 0}  # a stale high-water
    assert partition_lag([], {}.get) == {}
