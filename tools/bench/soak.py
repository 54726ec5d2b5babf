"""`livemb soak`: the real worker on the embedded broker at a fraction of its measured maximum for
a long time, watching what leaks: RSS growth after warm-up, consumer lag, error log lines.

1. a synthetic log and a small HierTCN (or --model/--items), the broker, the worker (subprocess)
2. max rate: the log replayed as fast as possible, events/s from the worker's own counter
3. soak: wall-clock-stamped clicks at `--load` x max for `--seconds`, sampled every `--every` s
4. a JSON report and a table; exit 1 when the worker fell behind (more than KEPT_UP_S seconds of
   the offered clicks sent and not applied when the clicks stop); everything started is stopped (by PID)
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from pathlib import Path

import orjson
from kafka import KafkaProducer

from livemb.core.settings import Settings
from livemb.stream.broker import free_port
from livemb.stream.kafka_io import replay
from livemb.tools.args import SoakArgs
from livemb.tools.harness import (
    embedded_broker,
    interrupt,
    metric_samples,
    prepare_model,
    rss_bytes,
    start_worker,
    stop_process,
    wait_ready,
)

log = logging.getLogger("livemb.soak")

KEPT_UP_S = 10.0  # the worker kept up when at most this many seconds of the offered clicks are unapplied at the end


def scrape(port: int) -> dict[str, float]:
    out: dict[str, float] = {"lag": 0.0}
    for s in metric_samples(port):
        if s.name == "livemb_events_total":
            out[s.labels["outcome"]] = s.value
        elif s.name == "livemb_consumer_lag":
            out["lag"] += s.value
        elif s.name == "livemb_fetch_max_wait_seconds":
            out["fetch_wait_ms"] = 1000 * s.value
    return out


def run_soak(args: SoakArgs, settings: Settings) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare_model(work, settings, model=args.model, items=args.items)  # a synthetic log, never --data
    df, model_path, items_path = prep.log, prep.model, prep.items
    users, items = sorted(map(str, set(df["user_id"]))), sorted(map(str, set(df["item_id"])))
    port = free_port()
    report: dict = {"seconds": args.seconds, "load": args.load, "samples": []}
    with embedded_broker(settings) as broker:
        worker = start_worker(broker.url, model_path, items_path, work / f"soak-{int(time.time())}", port,
                              work / "soak-worker.log")
        try:
            wait_ready(port, worker)
            n = replay(df, broker.url, settings.topic_in, progress=False)  # warm every user's state
            while scrape(port).get("ok", 0) < n:
                time.sleep(0.2)
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=2, acks=1)
            rng = random.Random(0)
            sent = 0

            def click() -> None:
                nonlocal sent
                u = rng.choice(users)
                doc = {"user_id": u, "item_id": rng.choice(items), "ts": int(time.time() * 1000),
                       "event_id": f"soak-{sent}"}
                producer.send(settings.topic_in, key=u.encode(), value=orjson.dumps(doc))
                sent += 1

            # Max rate: the same kind of clicks as the soak, as fast as they go, until all are applied.
            t0 = time.perf_counter()
            for _ in range(args.max_events):
                click()
            producer.flush()
            while scrape(port).get("ok", 0) < n + sent and time.perf_counter() - t0 < 900:
                time.sleep(0.2)
            max_eps = args.max_events / (time.perf_counter() - t0)
            base = n + sent
            rate = args.load * max_eps
            report.update(max_events_per_s=round(max_eps), offered_events_per_s=round(rate))
            print(f"max rate {max_eps:.0f} events/s ({args.max_events} clicks); soaking at {rate:.0f} events/s "
                  f"for {args.seconds:.0f}s")
            t_start = time.perf_counter()
            next_sample, sent = t_start, 0
            try:
                while (now := time.perf_counter()) - t_start < args.seconds:
                    for _ in range(max(0, int((now - t_start) * rate) - sent)):
                        click()
                    if now >= next_sample:
                        m = scrape(port)
                        s = {"t": round(now - t_start, 1), "rss_mb": round(rss_bytes(worker.pid) / 2**20, 1),
                             "lag": m["lag"], "ok": m.get("ok", 0), "sent": sent,
                             "fetch_wait_ms": round(m.get("fetch_wait_ms", 0.0))}
                        report["samples"].append(s)
                        log.info("soak t=%.0fs rss %.0f MB lag %d applied %d sent %d fetch wait %d ms", s["t"],
                                 s["rss_mb"], s["lag"], s["ok"] - base, sent, s["fetch_wait_ms"])
                        next_sample += args.every
                    time.sleep(0.005)
                producer.flush()
                # Clicks sent and not yet applied when the soak ends (the lag samples read the
                # consumer's last fetch high-water mark, which trails what was sent).
                report["backlog_end"] = round(base + sent - scrape(port).get("ok", 0))
            finally:
                producer.close()
        finally:
            stop_process(worker)
    errors = [ln for ln in (work / "soak-worker.log").read_text(errors="replace").splitlines()
              if "ERROR" in ln or "Traceback" in ln]
    samples = report["samples"]
    warm = [s for s in samples if s["t"] >= args.seconds * 0.2] or samples
    report.update(
        rss_after_warmup_mb=warm[0]["rss_mb"], rss_end_mb=samples[-1]["rss_mb"],
        rss_growth_pct=round(100 * (samples[-1]["rss_mb"] / warm[0]["rss_mb"] - 1), 1),
        lag_max=max(s["lag"] for s in samples), lag_end=samples[-1]["lag"], error_log_lines=len(errors),
        events_sent=sent, fetch_wait_end_ms=samples[-1]["fetch_wait_ms"],
        kept_up=report["backlog_end"] <= KEPT_UP_S * rate,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("| figure | value |\n|---|---|")
    for k in ("max_events_per_s", "offered_events_per_s", "events_sent", "rss_after_warmup_mb", "rss_end_mb",
              "rss_growth_pct", "lag_max", "lag_end", "backlog_end", "fetch_wait_end_ms", "error_log_lines", "kept_up"):
        print(f"| {k} | {report[k]} |")
    if not report["kept_up"]:
        print(f"the worker fell behind: {report['backlog_end']} clicks sent and not applied at the end, more than "
              f"{KEPT_UP_S:.0f} s of the offered {rate:.0f}/s; its RSS and lag figures measure a backlog, not a leak")
        return 1
    return 0
