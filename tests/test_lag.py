"""stream.lag: records behind per partition, from the fetch high-water: after a batch
(`partition_lag`, the sweep's test) and for every assigned partition (`LagTracker`, the metric)."""

from prometheus_client import CollectorRegistry, Gauge

from livemb.stream.lag import LagTracker, partition_lag


def test_lag_is_per_partition_from_its_last_consumed_offset() -> None:
    highwater = {("in", 0): 10, ("in", 1): 5, ("in", 2): None}.get
    consumed = [(("in", 0), 3), (("in", 1), 4), (("in", 0), 7), (("in", 2), 1)]
    # p0: offsets 8, 9 still to come; p1: caught up; p2: no high-water yet, left out
    assert partition_lag(consumed, highwater) == {("in", 0): 2, ("in", 1): 0}


def test_lag_is_never_negative_and_empty_for_an_empty_batch() -> None:
    assert partition_lag([(("in", 0), 12)], {("in", 0): 10}.get) == {("in", 0): 0}  # a stale high-water
    assert partition_lag([], {}.get) == {}


# ---------------------------------------------------------------- LagTracker: every assigned partition
def _gauge() -> tuple[Gauge, CollectorRegistry]:
    reg = CollectorRegistry()
    return Gauge("livemb_consumer_lag", "lag", ["partition"], registry=reg), reg


def _series(reg: CollectorRegistry) -> dict[str, float]:
    return {s.labels["partition"]: s.value for fam in reg.collect() for s in fam.samples}


def test_refresh_reports_every_assigned_partition_from_its_processed_position() -> None:
    g, reg = _gauge()
    t = LagTracker(g)
    hw = {("in", 0): 10, ("in", 1): 7, ("in", 2): 40, ("in", 3): None, ("in", 4): 9}
    t.batch_done([(("in", 0), 4), (("in", 0), 5)], hw.get)  # p0 processed up to offset 5
    assert _series(reg) == {"0": 4.0}
    # p1: no batch yet, the group's commit says 3; p2: the group has no commit (0); p4: not sought yet
    committed = {("in", 1): 3, ("in", 2): 0, ("in", 3): 0}.get
    got = t.refresh(hw.keys(), hw.get, committed)
    # p0: 10 - 6; p1: 7 - 3; p2: read from the start, 40 - 0; p3: no fetch yet, p4: commit unknown -> no series
    assert got == {("in", 0): 4, ("in", 1): 4, ("in", 2): 40}
    assert _series(reg) == {"0": 4.0, "1": 4.0, "2": 40.0}
    assert t.total() == 48


def test_a_stuck_agent_shows_a_growing_lag_on_the_timer() -> None:
    """No batch finishes, the broker's high-water grows: the series grows with it (it used to stay
    at the last batch's value, usually 0)."""
    g, reg = _gauge()
    t = LagTracker(g)
    hw = {("in", 0): 20}
    t.batch_done([(("in", 0), 19)], hw.get)
    assert _series(reg) == {"0": 0.0}
    seen = []
    for end in (25, 60, 200):
        hw[("in", 0)] = end
        t.refresh([("in", 0)], hw.get, {("in", 0): 15}.get)  # an older commit does not hide progress
        seen.append(_series(reg)["0"])
    assert seen == [5.0, 40.0, 180.0]


def test_revoked_partitions_lose_their_series_and_position() -> None:
    g, reg = _gauge()
    t = LagTracker(g)
    hw = {("in", 0): 10, ("in", 1): 30}
    t.batch_done([(("in", 0), 9), (("in", 1), 9)], hw.get)
    assert _series(reg) == {"0": 0.0, "1": 20.0}
    t.forget([("in", 1)])
    assert _series(reg) == {"0": 0.0}
    assert t.total() == 0 and ("in", 1) not in t.done
    # assigned again later, before the seek has read the group's commit: no series (not 30, "all of it")
    t.refresh([("in", 0), ("in", 1)], hw.get, {}.get)
    assert _series(reg) == {"0": 0.0} and t.total() == 0
    # once sought (another worker committed 25 meanwhile): the commit counts, not the old position
    t.refresh([("in", 0), ("in", 1)], hw.get, {("in", 1): 25}.get)
    assert _series(reg) == {"0": 0.0, "1": 5.0}
    t.forget([("in", 7)])  # never seen: no error


def test_refresh_drops_partitions_no_longer_assigned_even_without_a_revoke() -> None:
    g, reg = _gauge()
    t = LagTracker(g)
    hw = {("in", 0): 10, ("in", 1): 30}
    no_commit = dict.fromkeys(hw, 0).get
    t.refresh(hw.keys(), hw.get, no_commit)
    assert _series(reg) == {"0": 10.0, "1": 30.0}
    t.refresh([("in", 0)], hw.get, no_commit)
    assert _series(reg) == {"0": 10.0}
    t.refresh([], hw.get, no_commit)
    assert _series(reg) == {} and t.total() == 0


def test_batch_lag_for_the_sweep_is_unchanged() -> None:
    """stream/sweep.py defers while the batch's partitions are behind: batch_done returns that lag."""
    t: LagTracker = LagTracker()  # no gauge
    hw = {("in", 0): 1000, ("in", 1): 12}
    assert t.batch_done([(("in", 0), 100), (("in", 1), 11)], hw.get) == {("in", 0): 899, ("in", 1): 0}
