"""The real worker (`livemb worker`, HierTCN) on the embedded broker against the offline path.

Replays a synthetic log, SIGKILLs the worker mid-stream, restarts it on the same data dir, and
asserts that every user's last published embedding and candidates equal `livemb embed` on the same
log and checkpoint (1e-4): an event lost or applied twice would change the recurrent state. The
item table has categories, so the candidates go through the repeat path's category feature."""

from __future__ import annotations

import os
import signal

import numpy as np
import orjson
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from livemb.core.items import ItemTable
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.retrieval import Retriever
from livemb.models.serving import Serving
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.stream.broker import free_port
from livemb.stream.contracts import recommendations_schema
from livemb.stream.kafka_io import replay
from livemb.tools.data.synth import synth_log
from livemb.tools.harness import start_worker, stop_process, wait_ready
from livemb.tools.offline.commands import embed_users
from tests.conftest import wait_until
from tests.schema_check import errors

PARTITIONS = 4


SCHEMA = recommendations_schema()
EXTRA = ("--partitions", str(PARTITIONS), "--topk", "10", "--batch-max-events", "256")


class LastMessages:
    def __init__(self, bootstrap: str):
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        tps = [TopicPartition("recommendations", p) for p in range(PARTITIONS)]
        self.c.assign(tps)
        self.c.seek_to_beginning(*tps)
        self.last: dict[str, dict] = {}
        self.checked = 0

    def poll(self) -> dict[str, dict]:
        for recs in self.c.poll(200, max_records=20000).values():
            for r in recs:
                d = orjson.loads(r.value)
                self.checked += 1  # every record, the idle sweep's included, is in the contract
                assert errors(d, SCHEMA) == [], errors(d, SCHEMA)[:3]
                assert dict(r.headers) == {"schema_version": b"1", "content-type": b"application/json"}
                if d.get("session_closed"):  # the idle sweep's next-session message (stream/sweep.py)
                    continue
                self.last[d["user_id"]] = d  # keyed by user: partition order == that user's order
        return self.last


def small_hiertcn(tmp_path, seed: int, categories: bool = False):
    """A synthetic log, its item table (saved), a 1-epoch HierTCN and its checkpoint: what a worker test serves.
    The weights depend on `seed` alone, not on the tests that ran before in the process.
    `categories`: the table gives every item one of 7 categories, and the model reads them."""
    torch.manual_seed(seed)
    df, ids, vecs = synth_log(users=200, items=300, days=3, seed=seed, dim=16)
    table = ItemTable(ids, vecs, np.array([f"c{i % 7}" for i in range(len(ids))]) if categories else None)
    items = table.save(tmp_path / "items.npz")
    model = build_model("hiertcn", table.padded_vectors(), table.category_codes(), hidden=32, channels=16)
    train_model(model, list(sequences_from_frame(df, table).values()), TrainConfig(epochs=1), progress=False)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, table.fingerprint)
    return df, ids, table, items, model.eval(), ckpt


@pytest.mark.integration
def test_live_worker_equals_offline_embed_across_sigkill(broker, tmp_path):
    df, _, table, items, model, ckpt = small_hiertcn(tmp_path, seed=11, categories=True)
    assert model.cfg.item_categories  # the candidates below go through the category feature
    broker.create_topics(["interactions", "recommendations"], partitions=PARTITIONS)
    broker.create_topics(["interactions.dlq"], partitions=1)
    last_ts = df.groupby("user_id")["ts"].max().to_dict()

    data_dir, log = tmp_path / "state", tmp_path / "worker.log"
    port = free_port()
    w = start_worker(broker.url, str(ckpt), str(items), data_dir, port, log, EXTRA)
    out = LastMessages(broker.bootstrap)
    try:
        wait_ready(port, w, 120)
        replay(df, broker.url, "interactions", progress=False)
        wait_until(lambda: len(out.poll()) >= 50, 60, "some outputs before the kill")
        os.kill(w.pid, signal.SIGKILL)  # mid-stream: no flush, no commit, no LeaveGroup
        w.wait(10)
        port = free_port()
        w = start_worker(broker.url, str(ckpt), str(items), data_dir, port, log, EXTRA)
        wait_ready(port, w, 180)

        def caught_up() -> bool:
            last = out.poll()
            return len(last) == len(last_ts) and all(last[u]["event_ts"] >= last_ts[u] for u in last_ts)

        wait_until(caught_up, 180, "every user's last event published")
    finally:
        stop_process(w, 30)
        out.c.close()

    serving = Serving(model, table, Retriever(table.padded_vectors(), "flat", 10, "none"), "x")
    offline = {u: orjson.loads(m) for u, m in embed_users(serving, df)}
    live = out.last
    worst = max(np.abs(np.array(live[u]["embedding"]) - np.array(offline[u]["embedding"])).max() for u in offline)
    assert worst <= 1e-4, f"live vs offline max abs diff {worst}"
    assert all(live[u]["session_id"] == offline[u]["session_id"] for u in offline)
    assert all(len(live[u]["candidates"]) == 10 for u in offline)
    # the same candidates, in the same order, with the same scores (the repeat path included)
    assert all([c["item_id"] for c in live[u]["candidates"]] == [c["item_id"] for c in offline[u]["candidates"]]
               for u in offline)
    worst_score = max(abs(a["score"] - b["score"]) for u in offline
                      for a, b in zip(live[u]["candidates"], offline[u]["candidates"], strict=True))
    assert worst_score <= 1e-4, f"live vs offline candidate scores max abs diff {worst_score}"
    assert out.checked >= len(offline) and all(live[u]["dim"] == table.dim for u in offline)
