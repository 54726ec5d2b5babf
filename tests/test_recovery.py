"""Recovery against the real embedded broker (Tansu): a worker that loses its data directory
rebuilds exact state from the changelog; two workers in one group, one SIGKILLed, the survivor
finishes exactly and the partitions rebalance back. Workers are subprocesses stopped by PID."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import urllib.request
from collections.abc import Callable

import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from livemb.models.repeat import Variant
from livemb.models.retrieval import Retriever
from livemb.models.serving import Serving
from livemb.stream.broker import EmbeddedBroker, free_port
from livemb.stream.kafka_io import replay
from livemb.tools.harness import start_worker, stop_process, wait_ready
from livemb.tools.offline.commands import embed_users
from tests.conftest import WorkerProc, event, produce, wait_until
from tests.test_live_model import PARTITIONS, LastMessages, small_hiertcn
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


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(body) for s in f.samples
               if s.name == name and s.labels.get("outcome", "ok") == "ok")


@pytest.mark.integration
@pytest.mark.parametrize("standby", [0, 1])
def test_two_workers_one_killed_then_back(broker: EmbeddedBroker, tmp_path, standby: int) -> None:
    """Two `livemb worker`s in one group on 4 partitions; one is SIGKILLed mid-replay. The survivor
    takes its partitions, rebuilds their state from the changelog and finishes: every user's last
    output equals offline `embed` (1e-4). The killed one restarts, partitions rebalance back, more
    events arrive for every user, and the outputs still equal `embed` on the whole log.
    Every user also clicks an item of their own that the item table lacks, twice, at the end of
    the log: it comes back in the candidates of the same users as offline, on whichever worker
    serves them, across the kill and the rebalance (the open catalogue's pool, models/newitems.py).
    The workers serve the `rule` repeat path (recent items first), so whether a new item makes the
    top 10 does not hang on a 1-epoch model's weights."""
    df, ids, table, items, model, ckpt = small_hiertcn(tmp_path, seed=5)
    ends = df.groupby("user_id")["ts"].max()
    fresh = pd.DataFrame({"user_id": np.repeat(ends.index.to_numpy(), 2), "event_type": "click",
                          "ts": np.repeat(ends.to_numpy(), 2) + np.tile([1000, 2000], len(ends))})
    fresh["item_id"] = "new-" + fresh["user_id"].astype(str)
    fresh["event_id"] = fresh["item_id"] + "-" + fresh["ts"].astype(str)
    df = pd.concat([df, fresh[df.columns]], ignore_index=True)
    broker.create_topics(["interactions", "recommendations"], partitions=PARTITIONS)
    broker.create_topics(["interactions.dlq"], partitions=1)
    extra = ("--partitions", str(PARTITIONS), "--topk", "10", "--batch-max-events", "128",
             "--standby-replicas", str(standby), "--repeat-path", "rule")
    model.served = Variant("rule", model.served.exclude_seen)  # offline serves what the workers serve
    serving = Serving(model, table, Retriever(table.padded_vectors(), "flat", 10, "none"), "x")

    def start(name: str) -> tuple[object, int]:
        port = free_port()
        return start_worker(broker.url, str(ckpt), str(items), tmp_path / name, port, tmp_path / f"{name}.log",
                            extra), port

    def check(out: LastMessages, log: pd.DataFrame, timeout: float) -> None:
        last_ts = log.groupby("user_id")["ts"].max().to_dict()

        def caught_up() -> bool:
            last = out.poll()
            return len(last) == len(last_ts) and all(last[u]["event_ts"] >= last_ts[u] for u in last_ts)

        wait_until(caught_up, timeout, "every user's last event published")
        offline = {u: orjson.loads(m) for u, m in embed_users(serving, log)}
        live = out.poll()
        assert set(live) == set(offline)  # no user missing
        worst = max(np.abs(np.array(live[u]["embedding"]) - np.array(offline[u]["embedding"])).max() for u in offline)
        assert worst <= 1e-4, f"live vs offline max abs diff {worst}"
        assert all(live[u]["session_id"] == offline[u]["session_id"] for u in offline)
        # the users whose own new item came back:
        # the same live as offline, and the new items' pools really served
        back = {u for u in offline if f"new-{u}" in [c["item_id"] for c in live[u]["candidates"]]}
        assert back == {u for u in offline if f"new-{u}" in [c["item_id"] for c in offline[u]["candidates"]]}
        assert len(back) >= len(offline) // 2, f"{len(back)} of {len(offline)} users got their new item back"  # 199, 189

    (a, port_a), (b, port_b) = start("a"), start("b")
    out = LastMessages(broker.bootstrap)
    try:
        wait_ready(port_a, a, 120)
        wait_ready(port_b, b, 120)
        wait_until(lambda: _metric(port_a, "livemb_ready") == _metric(port_b, "livemb_ready") == 1, 60, "both ready")
        replay(df, broker.url, "interactions", progress=False)
        wait_until(lambda: _metric(port_b, "livemb_events_total") >= 300, 60, "worker b applied events")
        os.kill(b.pid, signal.SIGKILL)  # mid-stream: no flush, no commit, no LeaveGroup
        b.wait(10)
        check(out, df, 240)  # the survivor finished every user exactly

        b, port_b = start("b")  # same data dir: its rows are stale now, the changelog has newer ones
        wait_ready(port_b, b, 180)
        t_last = int(df["ts"].max())
        more = pd.DataFrame({"user_id": sorted(df["user_id"].unique()), "item_id": ids[0], "ts": t_last + 60_000,
                             "event_type": "click"})
        more["event_id"] = "more-" + more["user_id"].astype(str)
        both = pd.concat([df, more], ignore_index=True)
        wait_until(lambda: _metric(port_b, "livemb_ready") == 1 and _metric(port_a, "livemb_ready") == 1, 120,
                   "both ready after the rebalance back")
        replay(more, broker.url, "interactions", progress=False)
        check(out, both, 180)
        assert _metric(port_b, "livemb_events_total") > 0  # b got partitions back and served them
    finally:
        stop_process(a, 30)
        stop_process(b, 30)
        out.c.close()
