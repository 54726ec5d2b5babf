"""Hot swap under a running model worker (`livemb worker`, HierTCN) on the embedded broker.

While clicks flow, the checkpoint and the items file are replaced (atomic renames) and the worker
gets SIGHUP: outputs switch from the old `model`/`items_version` to the new one exactly once per
user, between batches, and no event is lost; `livemb_model_info` follows. A corrupt checkpoint and
a checkpoint that does not match the items are then refused with an error log, counted in
`livemb_model_reloads_total{result="refused"}`, and the previous model keeps serving. The periodic
check is set to an hour, so SIGHUP is what triggers each swap.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from livemb.core.items import ItemTable
from livemb.models.checkpoint import model_version, save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.stream.broker import free_port
from livemb.stream.kafka_io import replay
from livemb.tools.data.synth import synth_log
from livemb.tools.harness import start_worker, stop_process, wait_ready
from tests.conftest import wait_until

PARTITIONS = 2


def _train(df, table: ItemTable, path: Path, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    model = build_model("hiertcn", table.padded_vectors(), hidden=16, channels=8)
    train_model(model, list(sequences_from_frame(df, table).values()), TrainConfig(epochs=1), progress=False)
    save_checkpoint(path, model, table.fingerprint)
    return f"hiertcn@{model_version(path)}"


class Outputs:
    def __init__(self, bootstrap: str) -> None:
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
        tps = [TopicPartition("recommendations", p) for p in range(PARTITIONS)]
        self.c.assign(tps)
        self.c.seek_to_beginning(*tps)
        self.by_user: dict[str, list[dict]] = {}

    def poll(self) -> dict[str, list[dict]]:
        for recs in self.c.poll(200, max_records=20000).values():
            for r in recs:
                d = orjson.loads(r.value)
                self.by_user.setdefault(d["user_id"], []).append(d)
        return self.by_user

    def caught_up(self, last_ts: dict[str, int]) -> bool:
        got = self.poll()
        return all(u in got and got[u][-1]["event_ts"] >= t for u, t in last_ts.items())


def _metric(port: int, name: str, **labels: str) -> list[tuple[dict, float]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def _model_versions(port: int) -> list[str]:
    return [lab["version"] for lab, v in _metric(port, "livemb_model_info") if v == 1]


def _swap(src: Path, dst: Path) -> None:
    os.replace(src, dst)  # the deploy contract: write aside, rename over


@pytest.mark.integration
def test_hot_swap_under_traffic_and_refusals(broker, tmp_path):
    df, ids, vecs = synth_log(users=40, items=200, days=3, seed=3, dim=16)
    rng = np.random.default_rng(1)
    table_a = ItemTable(ids, vecs)
    table_b = ItemTable(ids, (vecs + 0.3 * rng.standard_normal(vecs.shape)).astype(np.float32))
    assert table_a.fingerprint != table_b.fingerprint
    live_ckpt, live_items = tmp_path / "model.pt", tmp_path / "items.npz"
    tag_a = _train(df, table_a, live_ckpt, seed=0)
    table_a.save(live_items)
    staged_items = table_b.save(tmp_path / "staged-items.npz")
    tag_b = _train(df, table_b, tmp_path / "staged.pt", seed=1)
    assert tag_a != tag_b
    ids8, vecs8 = ids, rng.standard_normal((len(ids), 8)).astype(np.float32)
    _train(df, ItemTable(ids8, vecs8), tmp_path / "dim8.pt", seed=2)  # an 8-d model: does not fit 16-d items
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint" * 64)

    broker.create_topics(["interactions", "recommendations"], partitions=PARTITIONS)
    broker.create_topics(["interactions.dlq"], partitions=1)
    half = len(df) // 2
    first, second = df.iloc[:half], df.iloc[half:]
    port, log = free_port(), tmp_path / "worker.log"
    extra = ("--partitions", str(PARTITIONS), "--topk", "5", "--reload-check-s", "3600", "--batch-max-events", "64")
    w = start_worker(broker.url, str(live_ckpt), str(live_items), tmp_path / "state", port, log, extra)
    out = Outputs(broker.bootstrap)
    try:
        wait_ready(port, w, 120)
        version_a = f"{tag_a.split('@')[1]}/items:{table_a.fingerprint}"
        version_b = f"{tag_b.split('@')[1]}/items:{table_b.fingerprint}"
        assert _model_versions(port) == [version_a]
        replay(first, broker.url, "interactions", progress=False)
        wait_until(lambda: out.caught_up(first.groupby("user_id")["ts"].max().to_dict()), 90, "phase 1 published")

        # files replaced, no SIGHUP: the hourly check does not notice them
        _swap(staged_items, live_items)
        _swap(tmp_path / "staged.pt", live_ckpt)
        time.sleep(2.0)
        assert _model_versions(port) == [version_a]

        # the second half flows while SIGHUP arrives
        sender = threading.Thread(target=replay, args=(second, broker.url, "interactions", 400.0, False))
        sender.start()
        time.sleep(len(second) / 400.0 / 3)
        t_hup = time.monotonic()
        os.kill(w.pid, signal.SIGHUP)
        wait_until(lambda: _model_versions(port) == [version_b], 30, "livemb_model_info shows the new model")
        swap_s = time.monotonic() - t_hup
        sender.join(60)
        wait_until(lambda: out.caught_up(df.groupby("user_id")["ts"].max().to_dict()), 90, "phase 2 published")
        assert _metric(port, "livemb_model_reloads_total", result="ok")[0][1] == 1

        # corrupt, then mismatching: refused, logged, counted; B keeps serving
        for n, bad in enumerate(("corrupt.pt", "dim8.pt"), start=1):
            _swap(tmp_path / bad, live_ckpt)
            os.kill(w.pid, signal.SIGHUP)
            wait_until(lambda n=n: _metric(port, "livemb_model_reloads_total", result="refused")[0][1] == n, 30,
                       f"refusal {n} counted")
            assert _model_versions(port) == [version_b]
        late_user = str(df["user_id"].iloc[-1])
        t_late = int(df["ts"].max()) + 1000
        replay(_frame(late_user, t_late), broker.url, "interactions", progress=False)
        wait_until(lambda: out.caught_up({late_user: t_late}), 60, "an event after the refusals is served")
        counts = {o: _metric(port, "livemb_events_total", outcome=o)[0][1] for o in ("ok", "late", "duplicate",
                                                                                      "invalid", "error")}
    finally:
        stop_process(w, 30)
        out.c.close()

    log_text = log.read_text(errors="replace")
    assert log_text.count("hot swap refused, keeping " + tag_b) == 2, log_text[-3000:]
    assert "dim8.pt" in log_text or "8-d" in log_text
    assert "Traceback" not in log_text
    # no event lost or applied twice: every event counted once, as applied
    assert counts["ok"] + counts["late"] == len(df) + 1 and counts["invalid"] == counts["error"] == 0, counts
    # per user, the tag switches from A to B once and never back; B messages carry B's items version
    switched = 0
    for u, msgs in out.by_user.items():
        tags = [m["model"] for m in msgs]
        assert set(tags) <= {tag_a, tag_b}, (u, set(tags))
        k = tags.index(tag_b) if tag_b in tags else len(tags)
        assert all(t == tag_a for t in tags[:k]) and all(t == tag_b for t in tags[k:]), (u, tags)
        assert all(m["items_version"] == (table_a if m["model"] == tag_a else table_b).fingerprint for m in msgs)
        switched += 0 < k < len(tags)
    assert switched > 0, "no user saw both models (the swap happened outside the traffic)"
    # the idle sweep ran in the live worker too: next-session messages for users idle past the gap
    closed = [m for msgs in out.by_user.values() for m in msgs if m.get("session_closed")]
    assert closed and all(m["embedding"] == m["next_session_embedding"] for m in closed)
    print(f"\nswap visible in livemb_model_info {swap_s:.2f}s after SIGHUP; {switched} users switched mid-stream; "
          f"events counted {counts}; {len(closed)} idle-session messages")


def _frame(user: str, ts: int):
    import pandas as pd

    return pd.DataFrame({"user_id": [user], "item_id": [str(1)], "ts": [ts], "event_type": ["click"],
                         "event_id": [f"late-{ts}"]})
