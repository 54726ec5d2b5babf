"""The Faust app: wiring only. Topics, the state table, the agent loop and the timers.

The per-batch logic (and the commit order) is `stream.batch.BatchStep`; Faust reaches it through
the two thin adapters below. Private Faust/aiokafka internals are in `stream.faust_compat`.
The one entry point is `livemb worker` (tools/cli.py), which calls `run_worker`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faust

from livemb.core.errors import ConfigError
from livemb.core.settings import Settings
from livemb.stream import faust_compat
from livemb.stream.batch import BatchStep
from livemb.stream.batching import adaptive_batches
from livemb.stream.evidence import EvidenceReader
from livemb.stream.gap_repair import GapRepair
from livemb.stream.heap import freeze_startup_objects
from livemb.stream.kafka_io import BrokerUnreachable, bootstrap_of, plain_consumer, wait_for_broker
from livemb.stream.lag import LagTracker
from livemb.stream.logs import quiet_repeats
from livemb.stream.metrics import Metrics, serve
from livemb.stream.ports import BatchProcessor, InputRecord, OutputRecord
from livemb.stream.reload import install_sighup, reload_tick
from livemb.stream.security import faust_credentials, kafka_python_security
from livemb.stream.shadow import Shadow
from livemb.stream.sweep import IdleSweep

log = logging.getLogger("livemb.worker")
TABLE_NAME = "user_state"
EXIT_AGENT_FAILED = 70  # EX_SOFTWARE: the agent loop raised; a supervisor should restart the worker


class TableStore:
    """StateStore over a Faust table: each row is read and written under an event of the user's
    partition, which is how Faust picks the RocksDB db and the changelog partition."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, user_id: str, at: InputRecord) -> bytes | None:
        with faust_compat.current_event(at.handle):
            return self.table.get(user_id.encode())

    def put(self, user_id: str, row: bytes, at: InputRecord) -> None:
        with faust_compat.current_event(at.handle):
            self.table[user_id.encode()] = row


class TopicSink:
    """OutputSink over the Faust app's producer: send everything, then wait for every ack.

    Straight to `app.producer` (the aiokafka producer, default key partitioner, as `Topic.send`
    uses) rather than `Topic.send`: Faust's per-message wrapping (FutureMessage, sensors,
    callbacks) cost ~0.3 ms per output on this machine, more than the model step per user."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def publish(self, records: Sequence[OutputRecord]) -> None:
        send = self.app.producer.send
        futs = [await send(r.topic, r.key, r.value, partition=r.partition, timestamp=None,
                           headers=list(r.headers) or None)
                for r in records]
        await asyncio.gather(*futs)


def faust_config(settings: Settings) -> dict[str, Any]:
    """Faust settings tuned for at-least-once on any broker, fast (re)joins on the embedded one.

    Topic durability (docs/STREAMING.md "Topic durability"): the one topic Faust creates, the
    state changelog, gets `settings.topic_replication` replicas and `topic_min_insync` (the table's
    `extra_topic_configs`, see `make_app`); every record (outputs, DLQ, changelog) is produced with
    acks=all. No leader topic: the worker runs no leader-only timers."""
    return dict(
        broker=settings.broker,
        store="rocksdb://",
        key_serializer="raw",  # every topic and the table carry bytes (orjson / state.record)
        value_serializer="raw",
        datadir=settings.data_dir,
        web_enabled=False,  # stream.metrics serves HTTP itself (up before recovery finishes)
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.topic_replication,
        topic_disable_leader=True,
        producer_acks=-1,  # acks=all: a record is acked once topic_min_insync replicas hold it
        table_standby_replicas=settings.standby_replicas,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",  # exactly_once: InitProducerId v0 fails on Tansu
        # On Kafka a local offset past the changelog's end means lost changelog data: stop loudly.
        # Off on the embedded broker only: memory storage, its ListOffsets end is low (docs/STREAMING.md).
        recovery_consistency_check=settings.broker_kind == "kafka",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
        stream_wait_empty=True,
        **({"consumer_group_instance_id": settings.group_instance_id} if settings.group_instance_id else {}),
        producer_linger=0.0,
        producer_max_batch_size=settings.producer_batch_bytes,
        broker_credentials=faust_credentials(settings),  # TLS / SASL (stream/security.py)
    )


def adaptive_fetch_wait(settings: Settings, metrics: Metrics) -> None:
    """Every Faust consumer created afterwards gets the adaptive fetch wait (stream/fetch_wait.py),
    shown on /metrics as livemb_fetch_max_wait_seconds: the worker's and the bench's passthrough's."""
    faust_compat.tune_fetch_wait(settings.fetch_max_wait_ms, settings.fetch_max_wait_cap_ms,
                                 on_change=lambda ms: metrics.fetch_wait.set(ms / 1000))
    metrics.fetch_wait.set(settings.fetch_max_wait_ms / 1000)


def make_app(settings: Settings, processor: BatchProcessor, metrics: Metrics,
             on_fatal: Callable[[BaseException], None] | None = None, shadow: Shadow | None = None) -> faust.App:
    """`on_fatal`: called when the agent loop raises (e.g. the broker refused a batch's outputs
    for good). Faust would only mark the agent crashed and leave the process up doing nothing.
    `shadow`: a challenger stepped beside `processor` (stream/shadow.py)."""
    adaptive_fetch_wait(settings, metrics)
    security = kafka_python_security(settings)
    faust_compat.install_exact_recovery(lambda: plain_consumer(settings.broker, security))
    app = faust.App(settings.app_id, **faust_config(settings))
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    t_in = app.topic(settings.topic_in, partitions=settings.partitions, **raw)
    schema = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    table = app.tables.add(
        faust_compat.GuardedTable(
            app, name=TABLE_NAME, partitions=settings.partitions, store="rocksdb://", schema=schema,
            key_type=bytes, value_type=bytes, extra_topic_configs=settings.topic_config(),
        )  # fmt: skip
    )
    step = BatchStep(
        settings, processor, TableStore(table), TopicSink(app),
        metrics, GapRepair(bootstrap_of(settings.broker), group_id=settings.app_id, security=security), shadow,
    )  # fmt: skip

    sweep = IdleSweep(settings, processor, TableStore(table), TopicSink(app), metrics)
    lag = LagTracker(metrics.consumer_lag)  # livemb_consumer_lag: after each batch and on the lag timer
    highwater = functools.partial(faust_compat.fetch_highwater, app)

    @app.on_partitions_revoked.connect
    async def _revoked(_app: Any, revoked: Any, **_: Any) -> None:
        step.forget([(tp.topic, tp.partition) for tp in revoked])
        sweep.forget([(tp.topic, tp.partition) for tp in revoked])
        lag.forget(revoked)  # their series go now: a stale copy double-counts after the rebalance

    @app.agent(t_in)
    async def interactions(stream: Any) -> None:
        faust_compat.widen_producer_buffer(app, 2 * settings.batch_max_events)
        freeze_startup_objects()  # start-up is over: full collections walk only what comes later
        try:
            async for batch in adaptive_batches(stream, settings.batch_max_events, settings.batch_max_wait_ms / 1000):
                await debug_stall()
                records = [InputRecord(m.topic, m.partition, m.offset, m.key, m.value, ev, tuple(m.headers or ()))
                           for ev in batch for m in (ev.message,)]  # fmt: skip
                report = await step.run(records)
                metrics.liveness.progressed()
                sweep.observe(records, report.applied)
                behind = lag.batch_done(((ev.message.tp, ev.message.offset) for ev in batch), highwater)
                await sweep.maybe_run(sum(behind.values()))  # between batches: idle sessions (stream/sweep.py)
        except Exception as e:  # the failed batch is not acked (stream/batching.py): a restart replays it
            if on_fatal is None:
                raise
            on_fatal(e)

    batches = 0

    async def debug_stall() -> None:
        """`debug_stall_after_batches` (tests only): hang inside the next batch, as an agent whose
        await never returns would; the event loop, timers, heartbeats and HTTP keep running."""
        nonlocal batches
        batches += 1
        if settings.debug_stall_after_batches is not None and batches > settings.debug_stall_after_batches:
            log.warning("debug_stall_after_batches=%d: the agent hangs here (a test setting)",
                        settings.debug_stall_after_batches)
            await asyncio.Event().wait()

    @app.timer(1.0)
    async def lag_timer() -> None:
        """Lag of every assigned input partition, also while no batch comes (stream/lag.py); feeds /healthz."""
        assigned = [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_in]
        lag.refresh(assigned, highwater, functools.partial(faust_compat.committed_offset, app))
        metrics.liveness.observe(lag.total(), metrics.readiness.ready)

    if settings.open_catalogue and settings.new_item_vectors and hasattr(processor, "apply_evidence"):
        reader = EvidenceReader(settings, processor, lambda: plain_consumer(settings.broker, security), metrics)

        @app.timer(0.25)
        async def new_item_evidence() -> None:
            """Fold the evidence topic (stream/evidence.py) between batches, on the agent's loop."""
            reader.poll()

    counted = False

    @app.timer(0.25)
    async def readiness() -> None:
        nonlocal counted
        rec = faust_compat.recovery_progress(app, time.monotonic())
        metrics.observe_recovery(rec.recovering, rec.to_restore, rec.remaining, rec.seconds)
        done = app.tables.recovery.completed.is_set() and not app.rebalancing and not rec.recovering
        if done and not counted:  # once, after recovery: rows already on disk
            metrics.users_in_state.set(sum(1 for _ in table.keys()))
            counted = True
        metrics.readiness.set("tables_recovered", done)
        metrics.readiness.set("model_loaded", processor.ready)
        reload_tick(processor, metrics)  # hot swap between batches (stream/reload.py)
        info = processor.model_info()
        if info is not None:
            metrics.set_model(info.model, info.version, info.device)

    return app


def log_durability(settings: Settings, brokers: int) -> None:
    """One line on the topic durability in force; a warning when the cluster has fewer brokers than
    the replication factor (creating the changelog would fail, or its partitions run under-replicated)."""
    log.info("topics: replication %d, min.insync.replicas %d, acks=all, recovery consistency check %s "
             "(broker_kind=%s, %d broker(s))", settings.topic_replication, settings.topic_min_insync,
             "on" if settings.broker_kind == "kafka" else "off", settings.broker_kind, brokers)
    if brokers < settings.topic_replication:
        log.warning("the cluster reports %d broker(s) but LIVEMB_TOPIC_REPLICATION=%d: Kafka refuses to create a "
                    "missing changelog topic with more replicas than brokers; set LIVEMB_TOPIC_REPLICATION and "
                    "LIVEMB_TOPIC_MIN_INSYNC to fit the cluster (LIVEMB_BROKER_KIND=embedded on the embedded broker)",
                    brokers, settings.topic_replication)


def run_worker(settings: Settings, processor: BatchProcessor, loglevel: str = "info",
               shadow: Shadow | None = None) -> None:
    """Blocking: serve HTTP, run the Faust worker until SIGTERM/SIGINT (then exit)."""
    try:  # Faust's RocksDB store needs the directory; a fresh checkout has none
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the data directory {settings.data_dir!r}: {e.strerror}") from None
    metrics = Metrics(stall_s=settings.healthz_stall_s)
    if shadow is not None:
        metrics.enable_shadow()
    server = serve(metrics, settings.web_port, settings.web_host)  # /readyz answers 503 while waiting
    log.info("metrics on http://%s:%s/metrics", settings.web_host, server.server_port)
    quiet_repeats()
    metrics.readiness.set("model_loaded", processor.ready)
    try:
        brokers = wait_for_broker(settings.broker, settings.broker_wait_s, security=kafka_python_security(settings))
    except BrokerUnreachable:
        server.shutdown()
        raise
    log_durability(settings, brokers)

    def exit_on_fatal(e: BaseException) -> None:
        # Not Faust's clean stop: it waits for the failed batch's events to be acked (stream_wait_empty),
        # which never happens. Exiting now is a crash like SIGKILL, which the commit order is made for:
        # written rows are in RocksDB's WAL, unacked events replay, state stays exactly-once.
        log.critical("the agent failed; the worker exits (code %d) so that it is restarted, and the failed batch, "
                     "never acked, is replayed: %r", EXIT_AGENT_FAILED, e, exc_info=e)
        logging.shutdown()
        os._exit(EXIT_AGENT_FAILED)

    app = make_app(settings, processor, metrics, on_fatal=exit_on_fatal, shadow=shadow)
    install_sighup(processor)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        server.shutdown()
