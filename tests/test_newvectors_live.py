"""The new items' stream vectors across workers (stream/evidence.py) on the embedded broker: a new
item clicked between known items by a user of one worker enters the candidates of a user of the
other worker of the group; both workers hold the same extension, and a SIGKILLed worker rebuilds
it from the evidence topic."""

from __future__ import annotations

import signal
import time

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from livemb.stream.broker import free_port
from livemb.tools.harness import metric_samples, start_worker, stop_process, wait_ready
from tests.conftest import event, produce, wait_until
from tests.test_live_model import small_hiertcn

PARTITIONS = 2
ENV = {"LIVEMB_NEW_ITEM_VECTORS": "1", "LIVEMB_NEW_ITEM_MIN_EVIDENCE": "2"}


def metric(port: int, name: str) -> float:
    return sum(s.value for s in metric_samples(port) if s.name == name)


def user_on(partition: int, prefix: str) -> str:
    """A user id whose key the default (murmur2) partitioner puts on `partition`."""
    return next(u for u in (f"{prefix}{i}" for i in range(1000))
                if (murmur2(u.encode()) & 0x7FFFFFFF) % PARTITIONS == partition)


def candidates_of(bootstrap: str, user: str) -> list[list[str]]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    tps = [TopicPartition("recommendations", p) for p in range(PARTITIONS)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    try:
        out = []
        for recs in c.poll(2000, max_records=10000).values():
            out += [[x["item_id"] for x in d["candidates"]] for r in recs for d in (orjson.loads(r.value),)
                    if d["user_id"] == user and not d.get("session_closed")]
        return out
    finally:
        c.close()


@pytest.mark.integration
def test_new_item_reaches_a_user_of_the_other_worker_and_survives_sigkill(broker, tmp_path):
    _, ids, table, items, _, ckpt = small_hiertcn(tmp_path, seed=5)
    broker.create_topics(["interactions", "recommendations"], partitions=PARTITIONS)
    broker.create_topics(["interactions.dlq", "new-item-evidence"], partitions=1)
    extra = ("--partitions", str(PARTITIONS), "--topk", str(len(table) + 10), "--batch-max-events", "64")
    ports = [free_port(), free_port()]
    procs = [start_worker(broker.url, str(ckpt), str(items), tmp_path / f"w{i}", ports[i], tmp_path / f"w{i}.log",
                          extra, env=ENV) for i in range(2)]
    try:
        for i in range(2):
            wait_ready(ports[i], procs[i], 150)
        # both workers of the group own a partition each once the rebalance settles
        wait_until(lambda: all(any(s.name == "livemb_consumer_lag" for s in metric_samples(p)) for p in ports), 90,
                   "each worker has a partition")
        a, b = user_on(0, "a"), user_on(1, "b")
        now = int(time.time() * 1000)
        produce(broker.bootstrap, [event(a, str(ids[1]), now), event(a, "born-x", now + 1000),
                                   event(a, str(ids[2]), now + 2000)])
        # the pairs reach the evidence topic and BOTH workers fold them: the same extension
        wait_until(lambda: all(metric(p, "livemb_new_items_indexed") == 1 for p in ports), 90,
                   "both workers index the new item")
        assert all(metric(p, "livemb_new_item_evidence_total") == 2 for p in ports)
        produce(broker.bootstrap, [event(b, str(ids[1]), now + 3000)])
        got = wait_until(lambda: candidates_of(broker.bootstrap, b), 60, "user b's message")
        assert "born-x" in got[-1]  # b never touched it: it came through the explore extension
        applied = [metric(p, "livemb_events_total") for p in ports]
        assert all(n > 0 for n in applied), applied  # a and b were served by different workers

        # SIGKILL one worker: its restart reads the evidence topic again and holds the item again
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        ports[1] = free_port()
        procs[1] = start_worker(broker.url, str(ckpt), str(items), tmp_path / "w1", ports[1], tmp_path / "w1.log",
                                extra, env=ENV)
        wait_ready(ports[1], procs[1], 150)
        wait_until(lambda: metric(ports[1], "livemb_new_items_indexed") == 1, 60, "the restarted worker rebuilt it")
    finally:
        for p in procs:
            stop_process(p, 30)
