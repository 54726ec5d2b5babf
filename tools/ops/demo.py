"""`livemb demo`: the main job end to end on the embedded default, stopping everything it started.

1. data: a synthetic log (or --data), a small HierTCN trained on it (or --model/--items)
2. the embedded broker (Tansu) on a free loopback port, topics created
3. the worker as a subprocess (the production entry point), waited on via /readyz
4. the log replayed into `interactions`; `recommendations` read until every user's latest event
   is reflected; a few users' live top-K and the latency summary from /metrics
5. worker stopped (SIGTERM, by PID), broker stopped
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from livemb.core.settings import Settings
from livemb.stream.broker import free_port
from livemb.stream.kafka_io import consume, live_clicks, replay
from livemb.tools.args import DemoArgs
from livemb.tools.harness import (
    embedded_broker,
    interrupt,
    metrics_text,
    prepare_model,
    start_worker,
    stop_process,
    wait_ready,
)
from livemb.tools.ops.dashboard import run_dashboard
from livemb.tools.ops.prom import LocalPrometheus

log = logging.getLogger("livemb.demo")


def quantile_from_text(text: str, name: str, q: float) -> float:
    """Quantile estimate (upper bucket bound) of a Prometheus histogram from /metrics text."""
    buckets = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name + "_bucket":
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total == 0:
        return float("nan")
    for le, count in buckets:
        if count >= q * total:
            return le
    return float("inf")


def _start_prometheus(dashboard: str | None, port: int) -> LocalPrometheus | None:
    """--dashboard PNG: a local Prometheus scraping the worker every second for the whole run."""
    if not dashboard:
        return None
    prom = LocalPrometheus([f"127.0.0.1:{port}"], interval_s=1.0).start()
    print(f"prometheus {prom.url} (pid {prom.proc.pid}) scraping the worker every 1 s")
    return prom


def _render_dashboard(prom: LocalPrometheus, out: str, live_start: float) -> None:
    time.sleep(3.0)  # two more scrapes after the last message
    t_end = time.time()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    counts = run_dashboard(prom.url, out, start=prom.started_at, end=t_end, step_s=1.0, window="5s")
    api = prom.api
    rate = max(float(v) for _, v in api.query_range(
        'sum(rate(livemb_events_total{job="livemb",outcome="ok"}[5s]))', prom.started_at, t_end, 1)[0]["values"])
    live = f"{int(t_end - live_start)}s"  # the live phase only: backfilled events are historic
    # the exact difference of the cumulative buckets (increase() extrapolates each bucket on its own,
    # which skews a quantile when the +Inf bucket holds a big backfill)
    b = 'sum by (le) (livemb_event_to_publish_seconds_bucket{job="livemb"}%s)'
    p99 = api.scalar(f"histogram_quantile(0.99, {b % ''} - {b % (' offset ' + live)})", t_end)
    print(f"  dashboard {out}: {sum(counts.values())} series; peak ok-event rate {rate:.0f}/s (PromQL "
          f"max of sum(rate(livemb_events_total{{outcome=\"ok\"}}[5s]))); live-phase event-to-publish p99 "
          f"{p99 * 1000:.0f} ms (histogram_quantile over the bucket counts now minus {live} ago)")


def run_demo(args: DemoArgs, settings: Settings) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prep = prepare_model(work, settings, data=args.data, model=args.model, items=args.items,
                         log_format=args.log_format)
    df, model_path, items_path = prep.log, prep.model, prep.items
    users = set(df["user_id"])
    last_ts = df.groupby("user_id")["ts"].max().to_dict()
    port = free_port()
    prom = None
    with embedded_broker(settings) as broker:
        data_dir = work / f"worker-{int(time.time())}"
        worker = start_worker(broker.url, model_path, items_path, data_dir, port, work / "worker.log")
        try:
            print(f"broker {broker.url} (pid {broker.pid}), worker pid {worker.pid}, metrics http://127.0.0.1:{port}/metrics")
            wait_ready(port, worker)
            prom = _start_prometheus(args.dashboard, port)
            t0 = time.perf_counter()
            n = replay(df, broker.url, settings.topic_in)
            pending = {u for u in users}
            latest: dict[str, dict] = {}

            def done(msg: dict) -> bool:
                u = msg["user_id"]
                latest[u] = msg
                if msg["event_ts"] >= last_ts[u]:
                    pending.discard(u)
                return not pending

            for _ in consume(broker.url, settings.topic_out, timeout_s=60.0, stop=done):
                pass
            dt = time.perf_counter() - t0
            print(f"\nreplayed {n} events for {len(users)} users; {len(users) - len(pending)} users up to date "
                  f"after {dt:.1f}s ({n / dt:.0f} events/s end to end)")
            for u in sorted(latest)[:5]:
                m = latest[u]
                top = ", ".join(f"{c['item_id']} ({c['score']:.2f})" for c in m["candidates"][:5])
                print(f"  {u} [{m['model']}, session {m['session_id']}]: {top}")
            # live phase: fresh clicks stamped now, so event-to-publish is a real latency
            n_live, rate = 600, 150.0
            items = sorted(set(df["item_id"]))[:200]
            if prom is not None:  # the last backfill batch's metrics land in a scrape before the live phase
                time.sleep(2.0)
            t_live = int(time.time() * 1000)
            live_clicks(broker.url, settings.topic_in, sorted(users), items, n_live, rate)
            lat = []
            want = n_live

            def live_done(msg: dict) -> bool:
                if msg["event_ts"] >= t_live:
                    lat.append(msg["emitted_at"] - msg["event_ts"])
                return len(lat) >= want

            for _ in consume(broker.url, settings.topic_out, timeout_s=5.0, stop=live_done):
                pass
            text = metrics_text(port)
            if lat:
                lat.sort()
                p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
                print(f"  live phase: {n_live} clicks at {rate:.0f}/s -> {len(lat)} messages (one per user and batch); "
                      f"event-to-publish p50 {p50} ms, p99 {p99} ms (from the messages' event_ts/emitted_at)")
            q = {p: quantile_from_text(text, "livemb_ingest_to_publish_seconds", p) for p in (0.5, 0.99)}
            print(f"  ingest-to-publish (histogram bucket bounds, all events): p50 <= {q[0.5] * 1000:.0f} ms, "
                  f"p99 <= {q[0.99] * 1000:.0f} ms")
            if prom is not None:
                _render_dashboard(prom, args.dashboard, t_live / 1000)
        finally:
            if prom is not None:
                prom.stop()
            stop_process(worker)
    print(f"demo finished in {time.perf_counter() - t_start:.0f}s; everything it started is stopped")
    return 0 if not pending else 1
