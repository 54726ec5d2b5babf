"""`livemb bench`: its bucket arithmetic by hand, and one tiny end-to-end run on the embedded broker."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from livemb.tools.bench.load import bucket_quantile, cpu_per_1k, per_batch, per_user


def test_bucket_quantile_of_the_observations_between_two_scrapes() -> None:
    before = [(0.01, 5), (0.05, 10), (0.1, 10), (math.inf, 10)]
    after = [(0.01, 5), (0.05, 60), (0.1, 99), (math.inf, 110)]  # cumulative: 0, 50, 89, 100 new ones
    assert bucket_quantile(before, after, 0.5) == 0.05  # 50 of 100 new observations <= 50 ms
    assert bucket_quantile(before, after, 0.51) == 0.1
    assert bucket_quantile(before, after, 0.89) == 0.1
    assert bucket_quantile(before, after, 0.9) == math.inf  # 11 above the top bound
    assert math.isnan(bucket_quantile(before, before, 0.5))


def test_per_batch_step_means_between_two_scrapes() -> None:
    before = {"livemb_batch_size_sum": 100.0, "livemb_batch_size_count": 4.0, "process": 0.2, "publish": 0.04}
    after = {"livemb_batch_size_sum": 160.0, "livemb_batch_size_count": 10.0, "process": 0.29, "publish": 0.10}
    # 6 new batches of 60 events: process 90 ms / 6, publish 60 ms / 6
    assert per_batch(before, after) == {"mean_batch": 10.0, "process_ms": 15.0, "publish_ms": 10.0}
    assert per_batch(after, after) == {}


def test_per_user_step_means_and_cpu_per_1k_events() -> None:
    before = {"livemb_batch_size_sum": 100.0, "livemb_batch_size_count": 4.0, "livemb_outputs_total": 90.0,
              "process": 0.2, "model_step": 0.05, "topk": 0.08, "publish": 0.04}
    after = {"livemb_batch_size_sum": 160.0, "livemb_batch_size_count": 10.0, "livemb_outputs_total": 150.0,
             "process": 0.29, "model_step": 0.065, "topk": 0.11, "publish": 0.10}
    # 6 new batches, 60 users: process 90 ms / 60, model step 15, top-K 30, publish 60
    assert per_user(before, after) == {"users_per_batch": 10.0, "process_ms": 1.5, "model_step_ms": 0.25,
                                       "topk_ms": 0.5, "publish_ms": 1.0, "process_other_ms": 0.75}
    assert per_user(after, after) == {}
    assert cpu_per_1k(3.0, 1500) == 2.0 and cpu_per_1k(1.0, 0) is None


@pytest.mark.integration
def test_tiny_bench_run_end_to_end(tmp_path) -> None:
    from livemb.tools.cli import main

    out = tmp_path / "b.json"
    rc = main(["bench", "--users", "150", "--items-n", "600", "--days", "4", "--train-events", "400",
               "--loads", "0.3", "--step-seconds", "3", "--live-max", "100", "--skip-offline", "--workdir", str(tmp_path),
               "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    r = json.loads(out.read_text())
    n = r["log"]["events"]
    assert r["log"]["live_clicks"] > 0  # sent after every throughput run: each of those drained the same n
    for run in ("passthrough", "worker", "two_workers"):  # committed after /readyz: at most the log, never the clicks
        assert 0 < r[run]["events"] <= n and r[run]["events_per_s"] > 0
    assert r["worker"]["events_per_s"] > 0 and r["passthrough"]["events_per_s"] > 0
    assert r["ratio_worker_passthrough"] == round(r["worker"]["events_per_s"] / r["passthrough"]["events_per_s"], 3)
    (step,) = r["latency"]
    assert r["live_max_per_s"] == 100 and step["offered_per_s"] == 30  # --live-max pins the offered rate
    assert r["scale_out_ratio"] == round(r["two_workers"]["events_per_s"] / r["worker"]["events_per_s"], 3)
    assert step["sent"] > 0 and step["messages"] > 0  # live clicks came back as recommendations
    assert 0 < step["p50_ms"] <= step["p99_ms"]
    assert r["worker"]["cpu_s_per_1k_events"] > 0 and step["cpu_s_per_1k_events"] > 0  # cost per click
    assert step["per_user"]["users_per_batch"] >= 1 and step["per_user"]["model_step_ms"] > 0
    (floor,) = r["floor"]  # the passthrough under the same step, on its own input topic
    assert floor["offered_per_s"] == 30 and floor["sent"] > 0 and floor["messages"] > 0
    assert 0 < floor["p50_ms"] <= floor["p99_ms"] and floor["cpu_s_per_1k_events"] > 0
    assert floor["worker_p99_le_ms"] is None and step["worker_p99_le_ms"] > 0  # the passthrough has no histogram
    assert "NaN" not in out.read_text()  # strict JSON for any reader
    assert (tmp_path / "b.png").stat().st_size > 0


def test_live_batch_step_by_step_in_process(tmp_path) -> None:
    """tools/bench/livebatch.py: every step of a live batch is timed and the steps add up to the batch."""
    from livemb.tools.bench.livebatch import STEPS, LiveBatches, measure

    lb = LiveBatches(tmp_path, users=40, items=300, warm_events=2)
    one = lb.batch(3)
    assert all(one[k] > 0 for k in STEPS)  # each wrapped object was called in the batch
    assert abs(sum(one[k] for k in (*STEPS, "other")) - one["total"]) < 1e-9
    (row,) = measure(lb, [5], reps=3)
    assert row["batch"] == 5 and abs(row["ms_per_user"]["total"] - row["ms"]["total"] / 5) <= 1e-3


def test_live_batch_whole_step_in_process(tmp_path) -> None:
    """tools/bench/livebatch.py --step: the worker's batch step over RocksDB rows; every event is
    applied (the warm rows hold the users' offsets), one message per user, the parts add up."""
    from livemb.tools.bench.livebatch import STEP_PARTS, LiveBatches, LiveSteps, measure

    ls = LiveSteps(LiveBatches(tmp_path, users=40, items=300, warm_events=1), tmp_path, idle_ms=1)
    one = ls.batch(3)
    assert len(ls.sink.records) == 3 and {r.topic for r in ls.sink.records} == {"recommendations"}
    assert ls.step.metrics.event_count("ok") == 3 + 3 * 40  # the warm-up's and this batch's, none skipped
    assert all(one[k] > 0 for k in ("validate", "read", "guard", "process", "write", "observe", "cpu"))
    parts = sum(one[k] for k in STEP_PARTS if k != "cpu")
    assert abs(parts - one["total"]) < 1e-9
    (row,) = measure(ls, [2], reps=2)
    assert row["batch"] == 2


def test_live_batch_with_several_clicks_per_user(tmp_path) -> None:
    """livebatch --events-per-user: backfill-like batches, several clicks per user in time order,
    one message per user, every click applied."""
    from livemb.tools.bench.livebatch import MAX_EVENTS_PER_USER, LiveBatches, LiveSteps

    lb = LiveBatches(tmp_path, users=40, items=300, warm_events=1, events_per_user=4.0)
    clicks = lb.clicks([f"u{j}" for j in range(30)])
    counts = np.unique(clicks, return_counts=True)[1]
    assert len(counts) == 30 and counts.max() > 1 and counts.max() <= MAX_EVENTS_PER_USER
    assert clicks[:30] == [f"u{j}" for j in range(30)]  # round-robin: every user's first click first
    ls = LiveSteps(lb, tmp_path)
    before = ls.step.metrics.event_count("ok")
    ls.batch(5)
    assert len(ls.sink.records) == 5
    assert ls.step.metrics.event_count("ok") - before > 5
