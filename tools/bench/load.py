"""The measuring parts of `livemb bench` (tools/bench/bench.py): counters, offered load, latency, report.

Latency of a step, two views:
- consumer side: a consumer of `recommendations` (fetch wait 5 ms) takes, for every message of
  the step, its receive time minus its `event_ts` (the wall-clock stamp of the user's latest
  event in the batch): what a downstream service sees, including its own fetch;
- worker side: the difference of `livemb_event_to_publish_seconds` buckets over the step; the
  quantile is the upper bound of the bucket it falls in.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import platform
import random
import threading
import time
from pathlib import Path

import aiokafka
import numpy as np
import orjson
from kafka import KafkaProducer

from livemb.core.extras import require
from livemb.stream import faust_compat
from livemb.stream.gap_repair import GapRepair
from livemb.tools.bench import components
from livemb.tools.harness import cpu_seconds, metric_samples, rss_bytes

LAT = "livemb_event_to_publish_seconds"


def ok_count(ports: list[int]) -> float:
    return sum(s.value for p in ports for s in metric_samples(p)
               if s.name == "livemb_events_total" and s.labels.get("outcome") == "ok")


class GroupProgress:
    """Input events a consumer group has committed (sum over partitions): what a run has done for
    good. The ok counters would count twice what a rebalance hands from one worker to the other
    before its commit (at-least-once), so the drain rate is taken from the commits."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int):
        self.repair, self.topic, self.parts = GapRepair(bootstrap, group_id=group), topic, list(range(partitions))

    def total(self) -> int:
        return sum(self.repair.fetch_committed(self.topic, self.parts).values())

    def close(self) -> None:
        self.repair.close()


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def batch_figures(port: int) -> dict:
    """Mean batch and the mean model-step / top-K seconds per batch, from the worker's histograms
    (and the shadow model's whole step, when one runs)."""
    v = {s.name: s.value for s in metric_samples(port) if s.name.endswith(("_sum", "_count"))}
    n = max(v.get("livemb_batch_size_count", 0), 1)
    steps = max(v.get("livemb_model_step_seconds_count", 0), 1)
    out = {"mean_batch": round(v.get("livemb_batch_size_sum", 0) / n, 1),
           "model_step_ms": round(1000 * v.get("livemb_model_step_seconds_sum", 0) / steps, 2),
           "topk_ms": round(1000 * v.get("livemb_topk_seconds_sum", 0) / steps, 2)}
    if v.get("livemb_shadow_step_seconds_count"):
        out["shadow_step_ms"] = round(1000 * v["livemb_shadow_step_seconds_sum"] / v["livemb_shadow_step_seconds_count"], 2)
    return out


# inside the `process` step: the model step and the top-K search (with the output messages)
_INNER = {"livemb_model_step_seconds_sum": "model_step", "livemb_topk_seconds_sum": "topk"}


def step_sums(port: int) -> dict[str, float]:
    """Sum and count of the batch size, every step's seconds (livemb_batch_step_seconds), the
    model step's and top-K's seconds, the messages published (one per user of a batch), and the
    shadow model's step ("shadow", part of "publish") when one runs."""
    out: dict[str, float] = {}
    for smp in metric_samples(port):
        if smp.name in ("livemb_batch_size_sum", "livemb_batch_size_count", "livemb_outputs_total"):
            out[smp.name] = smp.value
        elif smp.name == "livemb_batch_step_seconds_sum":
            out[smp.labels["step"]] = smp.value
        elif smp.name == "livemb_shadow_step_seconds_sum" and smp.value:
            out["shadow"] = smp.value
        elif smp.name in _INNER:
            out[_INNER[smp.name]] = smp.value
    return out


def per_batch(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch and mean ms per step per batch between two `step_sums` scrapes."""
    n = after.get("livemb_batch_size_count", 0) - before.get("livemb_batch_size_count", 0)
    if n <= 0:
        return {}
    out = {"mean_batch": round((after["livemb_batch_size_sum"] - before.get("livemb_batch_size_sum", 0)) / n, 1)}
    for k, v in after.items():
        if not k.startswith("livemb_"):
            out[f"{k}_ms"] = round(1000 * (v - before.get(k, 0)) / n, 2)
    return out


def per_user(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean users per batch and ms per step per user (a live batch's cost is per user: one model
    row, one search, one message each) between two `step_sums` scrapes; `process_other_ms` is
    the process step less the model step and the top-K (state decode/encode, grouping, quality)."""
    users = after.get("livemb_outputs_total", 0) - before.get("livemb_outputs_total", 0)
    n = after.get("livemb_batch_size_count", 0) - before.get("livemb_batch_size_count", 0)
    if users <= 0 or n <= 0:
        return {}
    out = {"users_per_batch": round(users / n, 2)}
    for k, v in after.items():
        if not k.startswith("livemb_"):
            out[f"{k}_ms"] = round(1000 * (v - before.get(k, 0)) / users, 3)
    if {"process_ms", "model_step_ms", "topk_ms"} <= set(out):
        out["process_other_ms"] = round(out["process_ms"] - out["model_step_ms"] - out["topk_ms"], 3)
    return out


def cpu_per_1k(cpu_s: float, events: float) -> float | None:
    """CPU-seconds per 1,000 events (None without events)."""
    return round(1000 * cpu_s / events, 3) if events > 0 else None


def _buckets(port: int) -> list[tuple[float, float]]:
    return sorted((float(s.labels["le"]), s.value) for s in metric_samples(port) if s.name == LAT + "_bucket")


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """Upper bucket bound of quantile q of the observations between two scrapes (inf: above the top)."""
    diff = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = diff[-1][1] if diff else 0
    if total <= 0:
        return float("nan")
    return next(le for le, c in diff if c >= q * total)


class LoadGenerator:
    """Wall-clock-stamped clicks from the log's users and items, paced every millisecond."""

    def __init__(self, bootstrap: str, topic: str, users: list[str], items: list[str], seed: int = 0):
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)
        self.topic, self.users, self.items = topic, users, items
        self.rng, self.sent = random.Random(seed), 0

    def run(self, rate: float, seconds: float) -> int:
        t0, sent = time.perf_counter(), 0
        while (el := time.perf_counter() - t0) < seconds:
            for _ in range(int(el * rate) - sent):
                u = self.rng.choice(self.users)
                doc = {"user_id": u, "item_id": self.rng.choice(self.items), "ts": int(time.time() * 1000),
                       "event_id": f"bench-{self.sent}"}
                self.producer.send(self.topic, key=u.encode(), value=orjson.dumps(doc))
                self.sent += 1
                sent += 1
            time.sleep(0.001)
        self.producer.flush()
        return sent

    def close(self) -> None:
        self.producer.close()


class OutputWatch(threading.Thread):
    """Consumer-side latency: receive time - the click's time (`ts_field`: the worker's messages
    carry it as event_ts, the passthrough's as the click's own ts) for every message stamped after `since_ms`.

    An aiokafka consumer on a loop of its own, with the worker's fetch-wait rule (5 ms, raised
    while the broker answers with nothing it holds: stream/fetch_wait.py). With a fixed short wait
    the embedded broker stops answering once the output topic holds ~20,000 batches a partition,
    and a long step's later messages would go unread. `start()` returns once the consumer is at
    the topic's end, before the step's first click."""

    def __init__(self, bootstrap: str, topic: str, since_ms: int, ts_field: str = "event_ts"):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.since_ms, self.ts_field = bootstrap, topic, since_ms, ts_field
        self.lat_ms: list[float] = []
        self.stop, self.ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        super().start()
        if not self.ready.wait(30.0) or self.error is not None:
            why = repr(self.error) if self.error is not None else "no answer in 30 s"
            self.stop.set()  # a reader still trying gives up at its next turn
            raise RuntimeError(f"the output reader did not reach the end of {self.topic}: {why}")

    def run(self) -> None:
        try:
            asyncio.run(self._read())
        except BaseException as e:
            self.error = e
            if self.ready.is_set():  # after start(): the step loses its later messages, so say it here
                raise
            self.ready.set()  # before: start() raises it

    async def _read(self) -> None:
        c = await faust_compat.started_consumer(5, 1000, bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            await c.topics()  # metadata of every topic, this one's partitions included
            parts = [aiokafka.TopicPartition(self.topic, p) for p in sorted(c.partitions_for_topic(self.topic) or [])]
            c.assign(parts)
            await c.seek_to_end(*parts)
            for tp in parts:
                await c.position(tp)  # resolve now, before the step's first click
            self.ready.set()
            while not self.stop.is_set():
                for recs in (await c.getmany(timeout_ms=50)).values():
                    now = time.time() * 1000
                    for r in recs:
                        ts = orjson.loads(r.value)[self.ts_field]
                        if ts >= self.since_ms:
                            self.lat_ms.append(now - ts)
        finally:
            await c.stop()


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else 1000 * seconds


def latency_step(gen: LoadGenerator, bootstrap: str, topic_out: str, port: int, fraction: float, rate: float,
                 seconds: float, rss_pid: int | None = None, pid: int | None = None, ts_field: str = "event_ts",
                 label: str = "load") -> dict:
    """`pid`: the worker's process, for its CPU-seconds per 1,000 applied events. `ts_field`: the
    output's field holding the click's time (the passthrough's output is the click itself: "ts")."""
    watch = OutputWatch(bootstrap, topic_out, int(time.time() * 1000), ts_field)
    watch.start()
    before, steps0 = _buckets(port), step_sums(port)
    ok0, t0 = ok_count([port]), time.perf_counter()
    cpu0 = cpu_seconds(pid) if pid is not None else 0.0
    sent = gen.run(rate, seconds)
    time.sleep(1.0)  # the last clicks' messages
    done = ok_count([port]) - ok0
    cpu = cpu_seconds(pid) - cpu0 if pid is not None else 0.0
    el = time.perf_counter() - t0
    steps1 = step_sums(port)
    after, steps, users = _buckets(port), per_batch(steps0, steps1), per_user(steps0, steps1)
    watch.stop.set()
    watch.join(5)
    lat = np.asarray(watch.lat_ms)
    q = (lambda p: round(float(np.percentile(lat, p)), 1)) if len(lat) else (lambda p: float("nan"))
    row = {"load": fraction, "offered_per_s": round(rate), "sent": sent, "applied_per_s": round(done / el),
           "messages": len(lat), "p50_ms": q(50), "p95_ms": q(95), "p99_ms": q(99),
           "worker_p50_le_ms": _ms(bucket_quantile(before, after, 0.5)),  # None: no histogram (the passthrough)
           "worker_p99_le_ms": _ms(bucket_quantile(before, after, 0.99)),
           "per_batch": steps, "per_user": users,
           "cpu_cores": round(cpu / el, 2) if pid is not None else None,
           "cpu_s_per_1k_events": cpu_per_1k(cpu, done) if pid is not None else None, "cdf_ms": [round(float(x), 1) for x in np.percentile(lat, np.arange(0, 101))] if len(lat) else []}
    if rss_pid is not None:
        row["rss_mb_end"] = round(rss_bytes(rss_pid) / 2**20)
    print(f"{label} {fraction:.0%} ({rate:.0f}/s for {seconds:.0f}s): applied {row['applied_per_s']}/s, "
          f"event-to-publish p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms (consumer side), "
          + (f"worker p99 <= {row['worker_p99_le_ms']:.0f} ms; " if row["worker_p99_le_ms"] is not None else "")
          + f"CPU s per 1k events {row['cpu_s_per_1k_events']}; "
          f"per batch {steps}; per user {users}", flush=True)
    return row


def offline_components(quick: bool, checkpoint: str | None = None, items: str | None = None,
                       sizes: list[int] | None = None) -> dict:
    """Retrieval at `sizes` items, the model step, state bytes (tools/bench/components.py)."""
    rows = components.run_all(quick=quick, checkpoint=checkpoint, items=items, sizes=None if quick else sizes)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        components.print_table(rows)
    return {"rows": rows, "table": text.getvalue()}


# the per-user columns: the process step's parts (model step, top-K search + output messages, the
# rest of process: state rows, grouping), then the other steps of the batch (stream/batch.py)
USER_STEPS = ("model_step", "topk", "process_other", "process", "publish", "write", "read", "validate", "guard",
              "gaps")


def markdown(r: dict) -> str:
    pt, w = r["passthrough"], r["worker"]
    lines = [
        f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; log {r['log']['events']} events, "
        f"{r['log']['users']} users", "",
        "| figure | value |", "|---|---|",
        f"| passthrough (trivial Faust agent) | {pt['events_per_s']} events/s; CPU cores: agent {pt['cpu_cores'][0]}, "
        f"broker {pt['broker_cpu_cores']}; CPU s per 1k events: agent {pt.get('cpu_s_per_1k_events', '-')} |",
        f"| worker, 1 process | {w['events_per_s']} events/s; CPU cores: worker {w['cpu_cores'][0]}, broker "
        f"{w['broker_cpu_cores']}; RSS {w['rss_mb']} MB; CPU s per 1k backfill events: worker "
        f"{w.get('cpu_s_per_1k_events', '-')} |",
        f"| worker / passthrough | {r['ratio_worker_passthrough']:.2f} |",
        f"| worker mean batch / model step / top-K | {w['mean_batch']} events / {w['model_step_ms']} ms / "
        f"{w['topk_ms']} ms" + (f"; shadow model {w['shadow_step_ms']} ms (its whole step)" if "shadow_step_ms" in w
                                else "") + " |",
        f"| worker, 2 processes | {r['two_workers']['events_per_s']} events/s; CPU cores: workers "
        f"{r['two_workers']['cpu_cores']}, broker {r['two_workers']['broker_cpu_cores']}; CPU s per 1k events: workers "
        f"{r['two_workers'].get('cpu_s_per_1k_events', '-')} |",
        f"| 2 workers / 1 worker | {r['scale_out_ratio']:.2f} |", "",
        "| load | offered/s | applied/s | p50 ms | p95 ms | p99 ms | worker p99 <= ms | mean batch | process / publish "
        "ms per batch | worker CPU s per 1k events | floor: passthrough p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    live = r["latency"] + ([r["soak"]] if "soak" in r else [])
    floor = {f["offered_per_s"]: f for f in r.get("floor", [])}
    for s in live:
        pb = s.get("per_batch") or {}
        fl = floor.get(s["offered_per_s"]) if s is not r.get("soak") else None
        lines.append(f"| {s['load']:.0%} | {s['offered_per_s']} | {s['applied_per_s']} | {s['p50_ms']} | "
                     f"{s['p95_ms']} | {s['p99_ms']} | {'-' if s['worker_p99_le_ms'] is None else round(s['worker_p99_le_ms'])} | "
                     f"{pb.get('mean_batch', '-')} | "
                     f"{pb.get('process_ms', '-')} / {pb.get('publish_ms', '-')}"
                     + (f" (shadow {pb['shadow_ms']})" if "shadow_ms" in pb else "")
                     + f" | {s.get('cpu_s_per_1k_events', '-')} | "
                     + (f"{fl['p50_ms']} / {fl['p99_ms']}" if fl else "-") + " |")
    lines += ["", "Live batches, ms per user (" + ", ".join(f"{k}" for k in USER_STEPS) + "):", "",
              "| load | users per batch | " + " | ".join(USER_STEPS) + " |", "|---|---|" + "---|" * len(USER_STEPS)]
    for s in live:
        pu = s.get("per_user") or {}
        lines.append(f"| {s['load']:.0%} | {pu.get('users_per_batch', '-')} | "
                     + " | ".join(str(pu.get(f"{k}_ms", "-")) for k in USER_STEPS) + " |")
    if "big_catalogue" in r:
        b = r["big_catalogue"]
        lines[7:7] = [f"| worker, {b['items']} items, {b['index']} (prebuilt in {b['index_build']['build_seconds_measured']} s) "
                      f"| {b['events_per_s']} events/s, RSS {b['rss_mb']} MB, top-K {b['topk_ms']} ms per batch |"]
    off = r.get("offline") or {}
    if "table" in off:
        lines += ["", off["table"]]
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    # third-party, only here: matplotlib stays off every other command's path
    matplotlib = require("matplotlib", "the bench plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = r["latency"]
    a.plot([s["offered_per_s"] for s in steps], [s["applied_per_s"] for s in steps], "o-", label="applied")
    a.plot([s["offered_per_s"] for s in steps], [s["offered_per_s"] for s in steps], "k:", label="offered")
    a.axhline(r["worker"]["events_per_s"], color="r", ls="--", label="backfill max")
    a.set(xlabel="offered events/s", ylabel="events/s", title="throughput vs offered load")
    a.legend()
    for s in steps:
        if s["cdf_ms"]:
            line, = b.plot(s["cdf_ms"], np.arange(101) / 100, label=f"{s['load']:.0%} load")
            fl = next((f for f in r.get("floor", []) if f["offered_per_s"] == s["offered_per_s"] and f["cdf_ms"]), None)
            if fl:  # the passthrough at the same rate: the broker's and Faust's share
                b.plot(fl["cdf_ms"], np.arange(101) / 100, ls="--", color=line.get_color(), lw=1,
                       label=f"{s['load']:.0%}: floor (passthrough)")
    b.set(xscale="log", xlabel="event-to-publish ms (consumer side)", ylabel="fraction", title="latency CDF")
    b.axvline(50, color="k", ls=":")
    b.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
