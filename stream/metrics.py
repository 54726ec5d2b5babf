"""Prometheus metrics (SPEC section 8, prefix `livemb_`) and the /metrics, /healthz, /readyz server.

The registry is a dedicated `CollectorRegistry` per `Metrics` object, so tests and the demo can run
several workers in one process without "Duplicated timeseries" errors; it also carries
prometheus_client's process (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
`process_open_fds`, ...) and platform (`python_info`) collectors. The HTTP server is a stdlib
thread, independent of Faust, so /healthz answers while tables are still recovering; /healthz is
`stream.health.Liveness` (503 with the reason when the agent is stalled), /readyz `Readiness`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from livemb.core.outcomes import Outcome
from livemb.models.base import EVENT_TYPES
from livemb.stream.health import Liveness
from livemb.stream.quality import KS, SOURCES, OnlineQuality

OUTCOMES = tuple(Outcome)  # the `outcome` label values
MODELS = ("champion", "shadow")  # the `model` label of the online quality series (stream/shadow.py)
LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Readiness:
    """Named conditions that must all be true for /readyz (e.g. tables_recovered, model_loaded)."""

    def __init__(self, *conditions: str) -> None:
        self._lock = threading.Lock()
        self._state = dict.fromkeys(conditions, False)

    def set(self, name: str, value: bool = True) -> None:
        with self._lock:
            self._state[name] = value

    def snapshot(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._state)

    @property
    def ready(self) -> bool:
        return all(self.snapshot().values())


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, stall_s: float = 0.0) -> None:
        """stall_s: the /healthz stall limit (`healthz_stall_s`; 0: /healthz is 200 while the process lives)."""
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)  # CPU, RSS, open fds of this process
        PlatformCollector(registry=r)
        p = "livemb_"
        self.events = Counter(p + "events_total", "Input events by outcome", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.events.labels(o)  # export zeros so alerts/rates work from the start
        self.event_to_publish = Histogram(
            p + "event_to_publish_seconds", "Event time to publish", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ingest_to_publish = Histogram(
            p + "ingest_to_publish_seconds", "Consume to publish", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(p + "batch_size", "Events per micro-batch", buckets=BATCH_BUCKETS, registry=r)
        self.model_step = Histogram(p + "model_step_seconds", "Batched model step", buckets=STEP_BUCKETS, registry=r)
        self.topk = Histogram(p + "topk_seconds", "Batched top-K search", buckets=STEP_BUCKETS, registry=r)
        self.batch_step = Histogram(p + "batch_step_seconds", "Wall time of each step of a micro-batch",
                                    ["step"], buckets=STEP_BUCKETS, registry=r)
        self.sessions_started = Counter(p + "sessions_started_total", "Session breaks", registry=r)
        self.sessions_closed = Counter(
            p + "sessions_closed_total", "Idle sessions closed by the sweep (next-session message sent)", registry=r
        )
        self.consumer_lag = Gauge(p + "consumer_lag", "Input records still to process, per assigned partition "
                                  "(fetch high-water - processed position; stream/lag.py)", ["partition"], registry=r)
        self.users_in_state = Gauge(p + "users_in_state", "Users with a state row", registry=r)
        self.fetch_wait = Gauge(p + "fetch_max_wait_seconds", "The input consumer's current fetch wait: raised above "
                                "fetch_max_wait_ms while the broker returns nothing it holds (stream/fetch_wait.py)",
                                registry=r)
        self.new_items_indexed = Gauge(p + "new_items_indexed", "New items (absent from the item table) with a "
                                       "stream vector in this worker's explore extension", registry=r)
        self.new_item_evidence = Counter(p + "new_item_evidence_total", "Co-occurrence pairs of a new item with a "
                                         "known item folded into the explore extension", registry=r)
        self.model_info = Gauge(p + "model_info", "Served model", ["model", "version", "device"], registry=r)
        self.outputs = Counter(p + "outputs_total", "Messages published to the output topic", registry=r)
        self.dlq = Counter(p + "dlq_total", "Messages published to the DLQ", ["reason"], registry=r)
        self.input_gaps = Counter(
            p + "input_gaps_total", "Input offsets never delivered to the agent (lost for state)", registry=r
        )
        self.recovering = Gauge(p + "recovering", "1 while table partitions are restored from the changelog",
                                registry=r)
        self.recovery_to_restore = Gauge(p + "recovery_records_to_restore",
                                         "Changelog records to restore in the current (or last) recovery", registry=r)
        self.recovery_restored = Gauge(p + "recovery_records_restored",
                                       "Changelog records restored so far in the current (or last) recovery",
                                       registry=r)
        self.recovery_seconds = Gauge(p + "recovery_seconds",
                                      "Duration of the current recovery, or of the last completed one", registry=r)
        self.ready_gauge = Gauge(p + "ready", "1 when /readyz is true", registry=r)
        # one series per /readyz condition, so an alert can tell "recovery stuck" from "no model"
        self.ready_condition = Gauge(
            p + "ready_condition", "1 when this /readyz condition holds", ["condition"], registry=r
        )
        self.model_reloads = Counter(
            p + "model_reloads_total", "Hot-swap attempts of the checkpoint/items by result", ["result"], registry=r
        )
        for res in ("ok", "refused"):
            self.model_reloads.labels(res)
        # online quality (stream/quality.py): bounded labels, every series of the served model
        # (model="champion") exported from the start, the shadow's once one runs (`enable_shadow`)
        self.online_targets = Counter(p + "online_targets_total", "Applied events of users who had been sent a "
                                      "recommendation list, by event type", ["event_type", "model"], registry=r)
        self.online_hits = Counter(p + "online_hits_total", "Targets whose item was in the first k candidates of "
                                   "the user's last list, by the hit candidate's source",
                                   ["k", "source", "event_type", "model"], registry=r)
        self.online_rr = Counter(p + "online_reciprocal_rank_total", "Sum over targets of 1 / (rank of the item in "
                                 "the user's last list), 0 when absent", ["event_type", "model"], registry=r)
        self._export_online("champion")
        self.shadow_step = Histogram(p + "shadow_step_seconds", "The shadow model's whole step per batch (decode, "
                                     "model, top-K, encode)", buckets=STEP_BUCKETS, registry=r)
        self.shadow_model_info = Gauge(p + "shadow_model_info", "The shadow (challenger) model",
                                       ["model", "version", "device"], registry=r)
        self.shadow_failures = Counter(p + "shadow_failures_total", "Batches the shadow model failed (its users' "
                                       "shadow state starts over)", registry=r)
        self.shadow_restarts = Counter(p + "shadow_restarts_total", "Stored shadow states the shadow refused "
                                       "(another model's) and started over", registry=r)
        self._shadow: tuple[str, str, str] | None = None
        self.readiness = Readiness("tables_recovered", "model_loaded")
        self.liveness = Liveness(stall_s)
        self._model: tuple[str, str, str] | None = None

    def count(self, outcomes: Mapping[Outcome, int]) -> None:
        for k, v in outcomes.items():
            if v:
                self.events.labels(k).inc(v)

    def _export_online(self, model: str) -> None:
        for et in EVENT_TYPES:
            self.online_targets.labels(et, model)
            self.online_rr.labels(et, model)
            for k in KS:
                for src in SOURCES:
                    self.online_hits.labels(str(k), src, et, model)

    def enable_shadow(self) -> None:
        """A shadow model runs: export its online quality series (model="shadow") at zero."""
        self._export_online("shadow")

    def observe_quality(self, q: OnlineQuality, model: str = "champion") -> None:
        """Add one batch's online quality counts of `model` (one of `MODELS`)."""
        assert model in MODELS, model
        for t in np.flatnonzero(q.targets):  # the nonzero counts only (a live batch has a few)
            et = EVENT_TYPES[t]
            self.online_targets.labels(et, model).inc(int(q.targets[t]))
            self.online_rr.labels(et, model).inc(float(q.rr_sum[t]))
        for j, s, t in zip(*np.nonzero(q.hits), strict=True):
            self.online_hits.labels(str(KS[j]), SOURCES[s], EVENT_TYPES[t], model).inc(int(q.hits[j, s, t]))

    def set_shadow_model(self, model: str, version: str, device: str) -> None:
        self._shadow = _set_info(self.shadow_model_info, self._shadow, (model, version, device))

    def observe_recovery(self, recovering: bool, to_restore: int, remaining: int, seconds: float) -> None:
        """Recovery progress and duration, from Faust's recovery state (stream.faust_compat)."""
        self.recovering.set(1 if recovering else 0)
        self.recovery_to_restore.set(to_restore)
        self.recovery_restored.set(to_restore - remaining)
        self.recovery_seconds.set(seconds)

    def set_model(self, model: str, version: str, device: str) -> None:
        self._model = _set_info(self.model_info, self._model, (model, version, device))

    def event_count(self, outcome: str) -> float:
        return float(self.registry.get_sample_value("livemb_events_total", {"outcome": outcome}) or 0.0)

    def latency_summary(self, hist: str = "event_to_publish_seconds") -> dict[str, float]:
        """count, p50 and p99 (seconds) estimated from the histogram buckets (linear within a bucket)."""
        return summarize_histogram(self.registry, "livemb_" + hist)

    def render(self) -> bytes:
        snap = self.readiness.snapshot()
        self.ready_gauge.set(1 if all(snap.values()) else 0)
        for name, ok in snap.items():
            self.ready_condition.labels(name).set(1 if ok else 0)
        return generate_latest(self.registry)


def summarize_histogram(registry: CollectorRegistry, name: str) -> dict[str, float]:
    buckets: list[tuple[float, float]] = []
    for fam in registry.collect():
        for s in fam.samples:
            if s.name == name + "_bucket":
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    return {"count": total, "p50_s": _quantile(buckets, 0.5), "p99_s": _quantile(buckets, 0.99)}


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lo_bound, lo_count = 0.0, 0.0
    for bound, cum in buckets:
        if cum >= rank:
            if bound == float("inf"):
                return lo_bound  # beyond the last finite bucket: report its bound (a lower bound)
            if cum == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (cum - lo_count)
        lo_bound, lo_count = bound, cum
    return lo_bound


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            why = self.metrics.liveness.problem()
            if why is None:
                self._send(200, b'{"ok":true}', "application/json")
            else:
                self._send(503, orjson.dumps({"ok": False, "reason": why}), "application/json")
        elif path == "/readyz":
            snap = self.metrics.readiness.snapshot()
            ok = all(snap.values())
            body = orjson.dumps({"ready": ok, "conditions": snap})
            self._send(200 if ok else 503, body, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # silence per-request logs
        return


def serve(metrics: Metrics, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve /metrics, /healthz, /readyz in a daemon thread; port 0 picks a free one (server.server_port)."""
    handler = type("Handler", (_Handler,), {"metrics": metrics})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="livemb-http", daemon=True).start()
    return server


def _set_info(gauge: Gauge, held: tuple[str, ...] | None, labels: tuple[str, ...]) -> tuple[str, ...]:
    """An info gauge shows exactly one label set: `labels` replaces `held` (nothing to do when equal)."""
    if held != labels:
        gauge.clear()
        gauge.labels(*labels).set(1)
    return labels
