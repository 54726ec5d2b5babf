"""Recovery against the real embedded broker (Tansu): a worker that loses its data directory
rebuilds exact state from the changelog; two workers in one group, one SIGKILLed, the survivor
finishes exactly and the partitions rebalance back. Workers are subprocesses stopped by PID."""

from __future__ import annotations

import collections
import shutil
import signal
from collections.abc import Callable

import pytest

from stream.broker import EmbeddedBroker
from tests.conftest import WorkerProc, event, produce
from tests.test_worker_integration import Outputs, setup_topics, table_counts

T0 = 1_700_000_000_000


def counts_of(w: WorkerProc) -> dict[str, int]:
    return {u: c for u, (_, c, _) in table_counts(w).items()}


@pytest.mark.integration
def test_wiped_data_dir_rebuilds_exact_state(broker: EmbeddedBroker, worker_factory: Callable[..., WorkerProc]) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start(batch_max_events=97)  # odd batch size: changelog batches of many different lengths
    w.wait_ready()
    users = [f"r{i}" for i in range(300)]
    expected: collections.Counter[str] = collections.Counter()
    out = Outputs(broker.bootstrap)
    try:
        for chunk in range(3):  # three bursts: the changelog's last batches differ in size per partition
            msgs = [event(users[i % 300], f"{chunk}-{i}", T0 + chunk * 10_000 + i) for i in range(1000 + 333 * chunk)]
            produce(broker.bootstrap, msgs)
            expected.update(users[i % 300] for i in range(len(msgs)))
            out.wait_for(dict(expected), 90, w)
        assert w.stop(signal.SIGTERM) == 0
        before = table_counts(w)
        assert {u: c for u, (_, c, _) in before.items()} == dict(expected)

        shutil.rmtree(w.data_dir)  # the disk is gone; the changelog is all that is left
        w.start()
        w.wait_ready(120)
        assert w.metric("livemb_recovery_records_restored") == w.metric("livemb_recovery_records_to_restore") > 0
        more = [event(u, "after", T0 + 100_000) for u in users]
        produce(broker.bootstrap, more)
        expected.update(users)
        out.wait_for(dict(expected), 90, w)
        assert w.metric("livemb_events_total", outcome="ok") == len(users)  # nothing re-applied
        assert w.metric("livemb_events_total", outcome="redelivered") == 0
    finally:
        out.close()
    assert w.stop(signal.SIGTERM) == 0
    after = table_counts(w)
    assert {u: c for u, (_, c, _) in after.items()} == dict(expected)
    assert {u: p for u, (p, _, _) in after.items()} == {u: p for u, (p, _, _) in before.items()}
