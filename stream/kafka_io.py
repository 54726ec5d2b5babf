"""Producer and consumer helpers for the CLI (kafka-python): replay a log, tail the output topic."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import orjson
from kafka import KafkaConsumer, KafkaProducer

from livemb.core.errors import Unavailable
from livemb.core.progress import progress as progress_bar

log = logging.getLogger("livemb.kafka")


def bootstrap_of(broker: str) -> str:
    """'kafka://h:p' (Faust style, possibly ';'-separated) -> 'h:p,h2:p2' for kafka-python."""
    return ",".join(b.split("://", 1)[-1] for b in broker.replace(";", ",").split(","))


class BrokerUnreachable(Unavailable):
    """No broker answered within the configured wait."""


def wait_for_broker(broker: str, wait_s: float = 0.0, first_delay_s: float = 0.5, max_delay_s: float = 10.0,
                    security: dict | None = None) -> int:
    """Block until the cluster answers a metadata request; retries with exponential backoff and one
    log line per try. Raises BrokerUnreachable after `wait_s` (0 = never). Returns how many brokers
    the cluster reports."""
    from kafka import KafkaAdminClient

    cfg: dict[str, object] = {"request_timeout_ms": 3000, "client_id": "livemb-probe"}
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3 retries 30 s by itself
        cfg["bootstrap_timeout_ms"] = 2000
    kafka_log = logging.getLogger("kafka")
    t0, delay, tries = time.monotonic(), first_delay_s, 0
    while True:
        tries += 1
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)  # the client's own per-connect errors: this loop reports instead
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_of(broker), **cfg, **(security or {}))
            try:
                cluster = admin.describe_cluster()
                if tries > 1:
                    log.info("broker %s reachable after %d tries (%.1fs)", broker, tries, time.monotonic() - t0)
                return len(cluster.get("brokers") or ())
            finally:
                admin.close()
        except Exception as e:  # noqa: BLE001 - every failure to connect reads the same to the operator
            waited = time.monotonic() - t0
            if wait_s and waited + delay > wait_s:
                raise BrokerUnreachable(f"broker {broker} unreachable for {waited:.0f}s ({type(e).__name__}); "
                                        "giving up (LIVEMB_BROKER_WAIT_S)") from None
            log.warning("broker %s unreachable (%s); try %d, retrying in %.1fs", broker, type(e).__name__, tries, delay)
            time.sleep(delay)
            delay = min(max_delay_s, delay * 2)
        finally:
            kafka_log.setLevel(level)


def plain_consumer(broker: str, security: dict | None = None):
    """A kafka-python consumer outside any group (assign + seek), for direct partition reads."""
    return KafkaConsumer(bootstrap_servers=bootstrap_of(broker), group_id=None, enable_auto_commit=False,
                         **(security or {}))


def replay(df, broker: str, topic: str, rate: float | None = None, progress: bool = True,
           security: dict | None = None) -> int:
    """Produce each event as JSON keyed by user_id, in time order; rate = events/s or None (max)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap_of(broker), linger_ms=5, acks=1, **(security or {}))
    cols = [c for c in ("user_id", "item_id", "ts", "event_type", "event_id") if c in df.columns]
    t0 = time.perf_counter()
    n = 0
    try:
        for n, row in enumerate(progress_bar(df[cols].itertuples(index=False), total=len(df), desc="replay",
                                     unit="ev", disable=not progress), start=1):
            doc = {k: v for k, v in zip(cols, row, strict=True) if v != ""}
            doc["ts"] = int(doc["ts"])
            producer.send(topic, key=str(doc["user_id"]).encode(), value=orjson.dumps(doc))
            if rate:
                ahead = n / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
    finally:
        producer.close()
    dt = time.perf_counter() - t0
    log.info("replayed %d events in %.1fs (%.0f ev/s)", n, dt, n / max(dt, 1e-9))
    return n


def live_clicks(broker: str, topic: str, users: list[str], items: list[str], n: int, rate: float,
                seed: int = 0) -> int:
    """Produce n fresh clicks stamped with the wall clock at send time (for event-to-publish latency)."""
    import random

    rng = random.Random(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap_of(broker), linger_ms=0, acks=1)
    t0 = time.perf_counter()
    try:
        for k in progress_bar(range(n), desc="live clicks", unit="ev"):
            u = rng.choice(users)
            doc = {"user_id": u, "item_id": rng.choice(items), "ts": int(time.time() * 1000), "event_id": f"live-{seed}-{k}"}
            producer.send(topic, key=u.encode(), value=orjson.dumps(doc))
            ahead = (k + 1) / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        producer.flush()
    finally:
        producer.close()
    return n


def consume(broker: str, topic: str, timeout_s: float, stop: Callable[[dict], bool] | None = None,
            from_beginning: bool = True, security: dict | None = None) -> Iterator[dict]:
    """Yield decoded messages until `stop(msg)` is true or nothing arrives for `timeout_s`."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap_of(broker), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest" if from_beginning else "latest",
                             consumer_timeout_ms=int(timeout_s * 1000), **(security or {}))
    try:
        for m in consumer:
            msg = orjson.loads(m.value)
            yield msg
            if stop is not None and stop(msg):
                return
    finally:
        consumer.close()


def tail(broker: str, topic: str, timeout_s: float = 3600.0, security: dict | None = None) -> None:
    for msg in consume(broker, topic, timeout_s, from_beginning=False, security=security):
        top = ", ".join(f"{c['item_id']}:{c['score']:.2f}" for c in msg.get("candidates", [])[:5])
        print(f"{msg.get('user_id')} session={msg.get('session_id')} model={msg.get('model')} top5=[{top}]",
              flush=True)
