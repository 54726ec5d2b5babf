"""`livemb demo`: the main job end to end on the embedded default, stopping everything it started.

1. data: a synthetic log (or --data), a small HierTCN trained on it (or --model/--items)
2. the embedded broker (Tansu) on a free loopback port, topics created
3. the worker as a subprocess (the production entry point), waited on via /readyz
4. the log replayed into `interactions`; `recommendations` read until every user's latest event
   is reflected; a few users' live top-K and the latency summary from /metrics
5. worker stopped (SIGTERM, by PID), broker stopped
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from core.settings import Settings

log = logging.getLogger("livemb.demo")


def _prepare(args, settings: Settings, work: Path):
    from core.items import ItemTable
    from tools.data.synth import synth_log, write_log
    from tools.offline import commands as offline

    if args.data:
        df = offline.load_log(args.data, args.columns, args.ts_unit)
    else:
        df, ids, vecs = synth_log(users=200, items=400, days=7, seed=0, dim=32)
        write_log(df, work / "synth.csv")
        ItemTable(ids, vecs).save(work / "items.npz")
        args.items = args.items or str(work / "items.npz")
    model_path = args.model
    if not model_path:
        model_path = str(work / "hiertcn.pt")
        train_args = argparse.Namespace(
            data=str(args.data or work / "synth.csv"), columns=args.columns, ts_unit=args.ts_unit,
            items=args.items, dim=32, item_vectors="symmetric", model="hiertcn", out=model_path,
            epochs=3, loss="hinge", batch_size=32, lr=3e-3)
        offline.cmd_train(train_args, settings)
        if not args.items:
            args.items = str(Path(model_path).with_suffix(".items.npz"))
    return df, model_path, args.items


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {proc.returncode} before becoming ready")
        if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"worker not ready after {timeout_s:.0f}s")


def start_worker(broker_url: str, model: str, items: str, data_dir: Path, port: int,
                 log_path: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """`livemb worker` as a child process (the production entry point); stop it with stop_process.
    `env`: extra LIVEMB_* settings for the child (e.g. its own LIVEMB_APP_ID)."""
    cmd = [sys.executable, "-m", "tools.cli", "worker", *extra, "--broker", broker_url, "--data-dir", str(data_dir), "--web-port", str(port),
           "--model", model, "--items", items]
    logf = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env} if env else None)


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def quantile_from_text(text: str, name: str, q: float) -> float:
    """Quantile estimate (upper bucket bound) of a Prometheus histogram from /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

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


def _start_prometheus(args, port: int):
    """--dashboard PNG: a local Prometheus scraping the worker every second for the whole run."""
    if not getattr(args, "dashboard", None):
        return None
    from tools.ops.prom import LocalPrometheus

    prom = LocalPrometheus([f"127.0.0.1:{port}"], interval_s=1.0).start()
    print(f"prometheus {prom.url} (pid {prom.proc.pid}) scraping the worker every 1 s")
    return prom


def _render_dashboard(prom, out: str, live_start: float) -> None:
    from tools.ops.dashboard import run_dashboard

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


def interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so every `finally` stops the worker and broker it started."""
    raise KeyboardInterrupt


def run_demo(args, settings: Settings) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    from stream.broker import EmbeddedBroker, free_port
    from stream.kafka_io import consume, live_clicks, replay

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    df, model_path, items_path = _prepare(args, settings, work)
    users = set(df["user_id"])
    last_ts = df.groupby("user_id")["ts"].max().to_dict()
    port = free_port()
    prom = None
    with EmbeddedBroker() as broker:
        broker.create_topics([settings.topic_in, settings.topic_out], partitions=settings.partitions)
        broker.create_topics([settings.topic_dlq], partitions=1)
        data_dir = work / f"worker-{int(time.time())}"
        worker = start_worker(broker.url, model_path, items_path, data_dir, port, work / "worker.log")
        try:
            print(f"broker {broker.url} (pid {broker.pid}), worker pid {worker.pid}, metrics http://127.0.0.1:{port}/metrics")
            wait_ready(port, worker)
            prom = _start_prometheus(args, port)
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
            text = _get(f"http://127.0.0.1:{port}/metrics")[1].decode()
            if lat:
                lat.sort()
                p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
                print(f"  live phase: {n_live} clicks at {rate:.0f}/s -> {len(lat)} messages; "
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
