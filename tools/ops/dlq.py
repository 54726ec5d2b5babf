"""`livemb schemas` (write / check docs/schemas/) and `livemb dlq tail|redrive` (the dead-letter topic).

`dlq tail` reads `interactions.dlq` from its beginning until it is idle for `--idle-s` and prints
the last `-n` records (optionally of one `--reason`): the reason, the source offset, key and value
(`--jsonl`: one JSON document per record, stream/dlq.py's `DlqEntry.to_json`, described by
docs/schemas/dlq.schema.json). `dlq redrive` re-produces DLQ records into the input topic with
their original key and headers (+ `livemb-redriven-from`): read from the DLQ, or from a
`--from-file` of `dlq tail --jsonl` lines the user fixed; `--reason`, `--since` (dead-lettered at
or after T) and `--from-offset` (DLQ offset) select. A record whose value was truncated is never
re-driven. Re-driving twice is harmless for events the worker applied: their event ids are in the
per-user dedupe memory, so the second copies count as `duplicate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer

from livemb.core.errors import ConfigError, DataError
from livemb.core.settings import Settings
from livemb.stream.contracts import stale_schemas, write_schemas
from livemb.stream.dlq import DlqEntry, redrive_headers
from livemb.stream.kafka_io import bootstrap_of
from livemb.stream.security import kafka_python_security
from livemb.tools.args import DlqArgs, SchemasArgs


def run_schemas(a: SchemasArgs, settings: Settings) -> int:
    out = Path(a.out)
    if a.check:
        stale = stale_schemas(out)
        for name in stale:
            print(f"{out / name}: differs from the generated schema (run `livemb schemas --out {out}`)")
        return 1 if stale else 0
    for path in write_schemas(out):
        print(path)
    return 0


def read_dlq(settings: Settings, idle_s: float) -> Iterator[DlqEntry]:
    """Every record of the DLQ topic, from the beginning, until `idle_s` without a new one."""
    c = KafkaConsumer(settings.topic_dlq, bootstrap_servers=bootstrap_of(settings.broker), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=int(idle_s * 1000), **kafka_python_security(settings))
    try:
        for r in c:
            yield DlqEntry(r.topic, r.partition, r.offset, r.key, r.value or b"", tuple(r.headers or ()))
    finally:
        c.close()


def read_file(path: str) -> Iterator[DlqEntry]:
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise ConfigError(f"--from-file {path}: {e.strerror}") from None
    for i, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield DlqEntry.from_json(orjson.loads(line))
            except (orjson.JSONDecodeError, ValueError) as e:
                raise DataError(f"{path}:{i}: {e}") from None


def since_ms(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: not epoch ms or ISO-8601") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def selected(entries: Iterable[DlqEntry], a: DlqArgs) -> Iterator[DlqEntry]:
    t0 = since_ms(a.since) if a.since else None
    for e in entries:
        if a.reason and e.reason != a.reason:
            continue
        if a.from_offset is not None and e.dlq_offset < a.from_offset:
            continue
        if t0 is not None and not ((ts := e.error()["timestamp"]) is not None and ts >= t0):  # type: ignore[operator]
            continue
        yield e


def text_line(e: DlqEntry) -> str:
    err = e.error()
    value = e.value.decode("utf-8", "replace")
    value = value if len(value) <= 200 else value[:200] + f"... ({len(e.value)} bytes)"
    key = None if e.key is None else e.key.decode("utf-8", "replace")
    return (f"{e.source} {err['reason']} from {err['topic']}[{err['partition']}]@{err['offset']} "
            f"key={key!r} value={value}")


def tail(a: DlqArgs, settings: Settings) -> int:
    if a.since or a.from_offset is not None or a.from_file or a.dry_run:
        raise ConfigError("--since, --from-offset, --from-file and --dry-run are redrive's flags")
    found = list(selected(read_dlq(settings, a.idle_s), a))
    for e in found[-a.n:] if a.n > 0 else found:
        print(orjson.dumps(e.to_json()).decode() if a.jsonl else text_line(e), flush=True)
    return 0


def redrive(a: DlqArgs, settings: Settings) -> int:
    entries = read_file(a.from_file) if a.from_file else read_dlq(settings, a.idle_s)
    todo, truncated = [], 0
    for e in selected(entries, a):
        if e.truncated:
            truncated += 1
        else:
            todo.append(e)
    if a.dry_run:
        for e in todo:
            print(f"would redrive {text_line(e)}")
    else:
        producer = KafkaProducer(bootstrap_servers=bootstrap_of(settings.broker), acks="all", linger_ms=5,
                                 **kafka_python_security(settings))
        try:
            futs = [producer.send(settings.topic_in, key=e.key, value=e.value,
                                  headers=list(redrive_headers(e.headers, e.source))) for e in todo]
            producer.flush(60)
            for f in futs:
                f.get(60)
        finally:
            producer.close()
    verb = "would redrive" if a.dry_run else "redriven"
    print(f"{verb} {len(todo)} record(s) into {settings.topic_in}"
          + (f"; {truncated} skipped (value truncated in the DLQ)" if truncated else ""), flush=True)
    return 0


def run_dlq(a: DlqArgs, settings: Settings) -> int:
    return tail(a, settings) if a.action == "tail" else redrive(a, settings)

