"""The real worker (`livemb worker`, HierTCN) on the embedded broker: its online quality counters
equal what the published `recommendations` messages give offline.

Offline, each event of the replayed log is scored against its user's latest message published
before the event was processed: the latest (non-`session_closed`) message whose `event_ts` is
below the event's ts (a message carries the ts of its user's latest applied event; the log's
timestamps increase strictly per user, so this is exact whatever the micro-batching). The log is
replayed at full speed, so many users have several events in one batch."""

from __future__ import annotations

from collections import defaultdict

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from livemb.stream.broker import free_port
from livemb.stream.kafka_io import replay
from livemb.stream.quality import KS
from livemb.tools.harness import metric_samples, start_worker, stop_process, wait_ready
from tests.conftest import wait_until
from tests.test_live_model import small_hiertcn

PARTITIONS = 2
EXTRA = ("--partitions", str(PARTITIONS), "--topk", "20", "--batch-max-events", "256")


def read_messages(c: KafkaConsumer, into: dict[str, list[dict]]) -> int:
    n = 0
    for recs in c.poll(200, max_records=20000).values():
        for r in recs:
            d = orjson.loads(r.value)
            n += 1
            if not d.get("session_closed"):  # the sweep's messages are not what is scored
                into[d["user_id"]].append(d)  # keyed by user: partition order == that user's order
    return n


def offline_counts(df, msgs: dict[str, list[dict]]) -> tuple[int, dict[int, int], float, dict[str, int]]:
    targets, hits, rr = 0, dict.fromkeys(KS, 0), 0.0
    by_type: dict[str, int] = defaultdict(int)
    for user, g in df.groupby("user_id", sort=False):
        ms = msgs.get(user, [])
        j = 0  # ms[:j]: messages published before this event was processed
        for item, ts, et in zip(g["item_id"], g["ts"], g["event_type"], strict=True):
            while j < len(ms) and ms[j]["event_ts"] < ts:
                j += 1
            if j == 0:
                continue
            targets += 1
            by_type[et] += 1
            cands = [c["item_id"] for c in ms[j - 1]["candidates"]]
            if item in cands:
                r = cands.index(item) + 1
                rr += 1 / r
                for k in KS:
                    hits[k] += r <= k
    return targets, hits, rr, dict(by_type)


def live_counts(port: int) -> tuple[float, dict[int, float], float, dict[str, float]]:
    targets, rr, hits, by_type = 0.0, 0.0, dict.fromkeys(KS, 0.0), defaultdict(float)
    for s in metric_samples(port):
        if s.name == "livemb_online_targets_total":
            targets += s.value
            by_type[s.labels["event_type"]] += s.value
        elif s.name == "livemb_online_hits_total":
            hits[int(s.labels["k"])] += s.value
        elif s.name == "livemb_online_reciprocal_rank_total":
            rr += s.value
    return targets, hits, rr, {k: v for k, v in by_type.items() if v}


@pytest.mark.integration
def test_live_counters_equal_the_published_messages(broker, tmp_path):
    df, _, _, items, _, ckpt = small_hiertcn(tmp_path, seed=11)
    assert df.groupby("user_id")["ts"].diff().dropna().gt(0).all()  # the offline rule needs strict order
    broker.create_topics(["interactions", "recommendations"], partitions=PARTITIONS)
    broker.create_topics(["interactions.dlq"], partitions=1)
    last_ts = df.groupby("user_id")["ts"].max().to_dict()
    port = free_port()
    w = start_worker(broker.url, str(ckpt), str(items), tmp_path / "state", port, tmp_path / "worker.log", EXTRA)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, group_id=None)
    msgs: dict[str, list[dict]] = defaultdict(list)
    try:
        tps = [TopicPartition("recommendations", p) for p in range(PARTITIONS)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        wait_ready(port, w, 120)
        replay(df, broker.url, "interactions", progress=False)

        def caught_up() -> bool:
            read_messages(c, msgs)
            return all(msgs[u] and msgs[u][-1]["event_ts"] >= t for u, t in last_ts.items())

        wait_until(caught_up, 240, "every user's last event published")
        want = offline_counts(df, msgs)
        # the counters move after the batch's state write, a moment after its messages
        wait_until(lambda: live_counts(port)[0] >= want[0], 30, "the worker counted every target")
        got = live_counts(port)
    finally:
        stop_process(w, 30)
        c.close()
    n_msgs = sum(len(v) for v in msgs.values())
    assert n_msgs < len(df)  # several events of a user shared a batch (and a message)
    targets, hits, rr, by_type = want
    assert targets > 0.5 * len(df)
    assert got[0] == targets and got[3] == by_type
    assert got[1] == hits and 0 < hits[1] <= hits[5] <= hits[10] <= hits[20] < targets
    assert got[2] == pytest.approx(rr, rel=1e-9)
