"""The Faust app and its one agent: wiring only (logic lives in stream.validate and state.guard).

Per micro-batch (commit order, see docs/STREAMING.md):
  1. validate; invalid -> DLQ
  2. read each user's envelope row (under that user's own event context), guard decides
     apply / late / duplicate / too_late / redelivered; too_late -> DLQ
  3. processor.process(applied events, inner states) -> new states + outputs
  4. publish outputs and DLQ records and wait for the broker's acks
  5. write each touched user's row = new state + guard (input offset, dedupe ring): ONE put
  6. ack the events; Faust flushes the producer (changelog) and then commits consumer offsets
A crash before 5 replays the batch (outputs may repeat: at-least-once); a crash after 5 skips the
re-delivered events by offset (state exactly-once).

Run: `python -m stream.app --broker kafka://127.0.0.1:PORT --data-dir DIR [--processor counting]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import faust
import numpy as np
import orjson
from faust.stores.rocksdb import Store as RocksDBStore
from faust.streams import _current_event
from faust.tables.table import Table

from state.guard import Decision, OffsetContinuity, keep_newer, plan_batch, wrap
from state.record import decode, encode
from stream.gap_repair import GapRepair, RepairedEvent
from stream.kafka_io import bootstrap_of
from stream.metrics import Metrics, serve
from stream.validate import Invalid, ValidEvent, reject, too_late, validate
from tools.settings import Settings, load_settings

log = logging.getLogger("livemb.worker")
TABLE_NAME = "user_state"


class BatchProcessor(Protocol):
    def process(
        self, events: list[ValidEvent], states: dict[str, bytes | None]
    ) -> tuple[dict[str, bytes], list[tuple[str, bytes]], dict[str, int]]:
        """events: the batch's applied events (arrival order); states: each of their users' own
        blob (None if new). Returns new blobs per user, (user_id, JSON bytes) outputs for
        `recommendations` (one per user), and outcome counters (e.g. unknown_item, sessions_started)."""
        ...


class CountingProcessor:
    """Test processor: state = per-user event count and last item; output = the count as JSON."""

    ready = True

    def process(
        self, events: list[ValidEvent], states: dict[str, bytes | None]
    ) -> tuple[dict[str, bytes], list[tuple[str, bytes]], dict[str, int]]:
        counts: dict[str, int] = {}
        last: dict[str, ValidEvent] = {}
        for uid, blob in states.items():
            counts[uid] = 0 if blob is None else int(decode(blob)[1]["count"])
        for ev in events:
            counts[ev.user_id] = counts.get(ev.user_id, 0) + 1
            last[ev.user_id] = ev
        new = {u: encode({"hist": np.zeros(1, np.int64)}, {"count": c, "last_ts": last[u].ts}) for u, c in counts.items()
               if u in last}  # fmt: skip
        now = int(time.time() * 1000)
        outs = [
            (u, orjson.dumps({"user_id": u, "count": counts[u], "event_ts": e.ts, "emitted_at": now}))
            for u, e in last.items()
        ]
        return new, outs, {}


class GuardedRocksDBStore(RocksDBStore):
    """RocksDB store whose changelog recovery never replaces a row by an older copy (state.guard)."""

    def apply_changelog_batch(
        self, batch: Iterable[Any], to_key: Callable[[Any], Any], to_value: Callable[[Any], Any]
    ) -> None:
        tp_offsets: dict[Any, int] = {}
        for event in batch:
            msg = event.message
            tp_offsets[msg.tp] = max(msg.offset, tp_offsets.get(msg.tp, -1))
            db = self._db_for_partition(msg.partition)
            if msg.value is None:
                db.delete(msg.key)
            else:
                db.put(msg.key, keep_newer(db.get(msg.key), msg.value))
        for tp, offset in tp_offsets.items():
            self.set_persisted_offset(tp, offset)


class GuardedTable(Table):
    def _new_store_by_url(self, url: Any) -> Any:
        return GuardedRocksDBStore(
            url, self.app, self, table_name=self.name, key_type=self.key_type,
            key_serializer=self.key_serializer, value_serializer=self.value_serializer,
            value_type=self.value_type, loop=self.loop, options=self.options,
        )  # fmt: skip


def faust_config(settings: Settings) -> dict[str, Any]:
    """Faust settings tuned for at-least-once on any broker, fast (re)joins on the embedded one."""
    return dict(
        broker=settings.broker,
        store="rocksdb://",
        key_serializer="raw",  # every topic and the table carry bytes (orjson / state.record)
        value_serializer="raw",
        datadir=settings.data_dir,
        web_enabled=False,  # stream.metrics serves HTTP itself (up before recovery finishes)
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",  # exactly_once: InitProducerId v0 fails on Tansu
        recovery_consistency_check=False,  # Tansu's ListOffsets end is low: see docs/STREAMING.md
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
        stream_wait_empty=True,
        **({"consumer_group_instance_id": settings.group_instance_id} if settings.group_instance_id else {}),
        producer_linger=0.0,
    )


def tune_fetch_wait(ms: int) -> None:
    """faust-streaming 0.15.3 hard-codes aiokafka's fetch_max_wait_ms=1500. Measured on Tansu: a
    fetch that finds no data waits that long even when data arrives meanwhile, which dominated
    event-to-publish latency; the worker's consumer gets `settings.fetch_max_wait_ms` instead."""
    import aiokafka

    base = getattr(aiokafka.AIOKafkaConsumer, "_livemb_base", aiokafka.AIOKafkaConsumer)

    class Consumer(base):  # type: ignore[misc, valid-type]
        _livemb_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = ms
            super().__init__(*args, **kwargs)

    aiokafka.AIOKafkaConsumer = Consumer  # faust's driver looks it up on the module at creation time


def make_app(settings: Settings, processor: BatchProcessor, metrics: Metrics) -> faust.App:
    tune_fetch_wait(settings.fetch_max_wait_ms)
    app = faust.App(settings.app_id, **faust_config(settings))
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    t_in = app.topic(settings.topic_in, partitions=settings.partitions, **raw)
    t_out = app.topic(settings.topic_out, partitions=settings.partitions, **raw)
    t_dlq = app.topic(settings.topic_dlq, partitions=1, **raw)
    schema = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    table = app.tables.add(
        GuardedTable(
            app, name=TABLE_NAME, partitions=settings.partitions, store="rocksdb://", schema=schema,
            key_type=bytes, value_type=bytes,
        )  # fmt: skip
    )
    lateness_ms = int(settings.max_lateness_s * 1000)
    continuity = OffsetContinuity()
    gaps = GapRepair(bootstrap_of(settings.broker))

    @app.on_partitions_revoked.connect
    async def _revoked(_app: Any, revoked: Any, **_: Any) -> None:
        continuity.forget(revoked)

    def with_event(event: Any) -> None:
        # Faust picks the row's RocksDB db and changelog partition from the *current event*.
        _current_event.set(None if event is None else _weak(event))

    async def handle(batch: Sequence[Any]) -> None:
        t0 = time.perf_counter()
        now_ms = int(time.time() * 1000)
        metrics.batch_size.observe(len(batch))
        valid: list[ValidEvent] = []
        user_event: dict[str, Any] = {}
        bad: list[Invalid] = []
        context = {ev.message.tp: ev for ev in batch}  # a real event per partition, for repaired rows
        repaired: list[Any] = []
        for tp, missing, seen in continuity.observe([(ev.message.tp, ev.message.offset) for ev in batch]):
            log.warning("input %s: offsets %d..%d were skipped by the consumer; re-reading them", tp, missing, seen - 1)
            metrics.input_gaps.inc(seen - missing)
            loop = asyncio.get_running_loop()
            repaired += await loop.run_in_executor(None, gaps.fetch, tp, missing, seen)
        batch = [*repaired, *batch]  # a hole precedes the offsets after it; users live in one partition
        for ev in batch:
            m = ev.message
            v = validate(m.value, m.topic, m.partition, m.offset, now_ms, settings, key=m.key)
            if isinstance(v, Invalid):
                bad.append(v)
            else:
                valid.append(v)
                user_event[v.user_id] = context[m.tp] if isinstance(ev, RepairedEvent) else ev
        rows: dict[str, bytes | None] = {}
        for uid, ev in user_event.items():
            with_event(ev)
            rows[uid] = table.get(uid.encode())
        with_event(None)
        plan = plan_batch(valid, rows, settings.dedupe_memory, lateness_ms)
        for uid, err in plan.unreadable.items():
            log.error("state row of user %r is unreadable, its events go to the DLQ: %s", uid, err)
        bad.extend(reject(e, "state_unreadable") for e in plan.rejected)
        bad.extend(too_late(e) for e in plan.too_late())
        inner_in = {e.user_id: plan.inner[e.user_id] for e in plan.to_apply}
        new_inner: dict[str, bytes] = {}
        outputs: list[tuple[str, bytes]] = []
        extra: dict[str, Any] = {}
        errors = 0
        if plan.to_apply:
            ts0 = time.perf_counter()
            try:
                new_inner, outputs, extra = processor.process(plan.to_apply, inner_in)
            except Exception:  # noqa: BLE001 - a model bug must not kill the worker or lose events silently
                log.exception("processor failed on a batch of %d events; they go to the DLQ", len(plan.to_apply))
                bad.extend(reject(e, "processing_error") for e in plan.to_apply)
                errors = len(plan.to_apply)
            metrics.model_step.observe(float(extra.get("model_step_seconds", time.perf_counter() - ts0)))
            if "topk_seconds" in extra:
                metrics.topk.observe(float(extra["topk_seconds"]))
        # Publish outputs + DLQ and wait for the acks *before* the state write (see module doc).
        futs = [await t_out.send(key=u.encode(), value=val) for u, val in outputs]
        futs += [await t_dlq.send(key=None, value=b.dlq_payload()) for b in bad]
        if futs:
            await asyncio.gather(*futs)
        pub_ms, t_pub = time.time() * 1000, time.perf_counter()
        last_ts = {e.user_id: e.ts for e in plan.to_apply}
        for u, _ in outputs:
            if u in last_ts:
                metrics.event_to_publish.observe(max(0.0, (pub_ms - last_ts[u]) / 1000))
            metrics.ingest_to_publish.observe(t_pub - t0)
        # ONE put per user: new state + guard (offset, dedupe ring), under the user's own event.
        for uid in plan.dirty:
            with_event(user_event[uid])
            table[uid.encode()] = wrap(plan.guards[uid], new_inner.get(uid, plan.inner[uid]))
        with_event(None)
        record_batch_metrics(batch, plan, bad, outputs, extra, errors, rows)

    def record_batch_metrics(
        batch: Sequence[Any], plan: Any, bad: list[Invalid], outputs: list[Any], extra: dict[str, Any],
        errors: int, rows: dict[str, bytes | None],
    ) -> None:  # fmt: skip
        counts = plan.counts()
        n_dlq_other = counts.get("too_late", 0) + errors + len(plan.rejected)
        counts["invalid"] = len(bad) - n_dlq_other
        counts["error"] = errors + len(plan.rejected)
        counts["unknown_item"] = int(extra.get("unknown_item", 0))
        metrics.count(counts)
        metrics.users_in_state.inc(sum(1 for u in plan.dirty if rows.get(u) is None))
        metrics.sessions_started.inc(int(extra.get("sessions_started", 0)))
        metrics.outputs.inc(len(outputs))
        for b in bad:
            metrics.dlq.labels(b.reason).inc()
        last: dict[Any, int] = {ev.message.tp: ev.message.offset for ev in batch}
        for tp, off in last.items():
            hw = app.consumer.highwater(tp)
            if hw is not None:
                metrics.consumer_lag.labels(str(tp.partition)).set(max(0, hw - off - 1))

    @app.agent(t_in)
    async def interactions(stream: Any) -> None:
        # Each state write queues one changelog message; let a whole batch fit before Faust's
        # conductor pauses for the producer buffer (default 100).
        app.producer.buffer.max_messages = max(100, 2 * settings.batch_max_events)
        async for batch in stream.take_events(settings.batch_max_events, within=settings.batch_max_wait_ms / 1000):
            await handle(batch)

    counted = False

    @app.timer(0.25)
    async def readiness() -> None:
        nonlocal counted
        done = app.tables.recovery.completed.is_set() and not app.rebalancing
        if done and not counted:  # once, after recovery: rows already on disk
            metrics.users_in_state.set(sum(1 for _ in table.keys()))
            counted = True
        metrics.readiness.set("tables_recovered", done)
        metrics.readiness.set("model_loaded", bool(getattr(processor, "ready", True)))
        info = getattr(processor, "model_info", None)  # optional: () -> (model, version, device)
        if callable(info):
            metrics.set_model(*info())

    app.livemb = {"table": table, "metrics": metrics, "decisions": Decision}  # type: ignore[attr-defined]
    return app


def _weak(event: Any) -> Any:
    import weakref

    return weakref.ref(event)


def run_worker(settings: Settings, processor: BatchProcessor, loglevel: str = "info") -> None:
    """Blocking: serve HTTP, run the Faust worker until SIGTERM/SIGINT (then exit)."""
    metrics = Metrics()
    server = serve(metrics, settings.web_port, settings.web_host)
    log.info("metrics on http://127.0.0.1:%s/metrics", server.server_port)
    app = make_app(settings, processor, metrics)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        server.shutdown()


def load_processor(spec: str, settings: Settings) -> BatchProcessor:
    """'counting' or 'module:factory' where factory(settings) -> BatchProcessor."""
    if spec == "counting":
        return CountingProcessor()
    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)(settings)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stream.app")
    ap.add_argument("--broker")
    ap.add_argument("--data-dir")
    ap.add_argument("--web-port", type=int)
    ap.add_argument("--partitions", type=int)
    ap.add_argument("--app-id")
    ap.add_argument("--batch-max-events", type=int)
    ap.add_argument("--model", help="checkpoint (default processor becomes the model processor)")
    ap.add_argument("--items")
    ap.add_argument("--processor", help="'counting' or module:factory(settings)")
    ap.add_argument("--loglevel", default="info")
    a = ap.parse_args(argv)
    settings = load_settings(
        broker=a.broker, data_dir=a.data_dir, web_port=a.web_port, partitions=a.partitions, app_id=a.app_id,
        batch_max_events=a.batch_max_events, model_path=a.model, items_path=a.items,
    )
    spec = a.processor or ("stream.processor:make_processor" if settings.model_path else "counting")
    run_worker(settings, load_processor(spec, settings), a.loglevel)


if __name__ == "__main__":
    main()
