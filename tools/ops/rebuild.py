"""`livemb rebuild-state (--from-beginning | --from-timestamp T)`: backfill a fresh state table.

1. A new app id (default `<app_id>-rebuild-<unix time>`) = a new consumer group and a new state
   table/changelog; nothing of the running workers is touched.
2. The new group's offsets on the input topic are committed at the start point: the earliest
   offset, or per partition the first record whose Kafka timestamp is >= T (found by a binary
   search over fetched records: works on any broker, including ones whose ListOffsets by time is
   unreliable).
3. `livemb worker` (the production entry point) runs under the new app id with its own data dir
   and the given (new) model, publishing to a scratch output topic (its outputs are historic),
   until the group's committed offsets reach the input's end as it was at the start; progress is
   logged (count, rate, ETA).
4. Switch-over: the worker is stopped (its state and offsets are committed), and an env file with
   `LIVEMB_APP_ID`, `LIVEMB_DATA_DIR` (and the model paths) is written atomically (temp file +
   rename). Restart the production workers with it: they continue from the new group's offsets on
   the rebuilt state. Going back = restarting them with the old values (the old group, table and
   changelog are left as they were).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from livemb.core.errors import ConfigError, LivembError
from livemb.core.progress import progress as progress_bar
from livemb.core.settings import Settings
from livemb.stream.broker import create_topics, free_port
from livemb.stream.kafka_io import bootstrap_of
from livemb.stream.security import kafka_python_security
from livemb.tools.args import RebuildArgs
from livemb.tools.harness import stop_process, worker_command

log = logging.getLogger("livemb.rebuild")


class RebuildError(LivembError):
    """The rebuild could not finish: its worker died or it did not catch up in time (the CLI prints
    it as one line)."""


def _consumer(settings: Settings, group: str | None = None):
    return KafkaConsumer(bootstrap_servers=bootstrap_of(settings.broker), group_id=group, enable_auto_commit=False,
                         consumer_timeout_ms=2000, **kafka_python_security(settings))


def _fetch_one(c, tp, offset: int):
    """The first record at or after `offset` (None past the end)."""
    c.seek(tp, offset)
    for _ in range(5):
        recs = c.poll(1000, max_records=1).get(tp, [])
        if recs:
            return recs[0]
    return None


def partition_bounds(settings: Settings) -> dict[int, tuple[int, int]]:
    """Per input partition: (first offset, end offset) from fetches (the fetch high-water mark)."""
    c = _consumer(settings)
    try:
        tps = [TopicPartition(settings.topic_in, p) for p in range(settings.partitions)]
        begin = c.beginning_offsets(tps)
        out = {}
        for tp in tps:
            c.assign([tp])  # one partition at a time: poll() then returns only its records
            first = _fetch_one(c, tp, begin[tp])
            hw = c.highwater(tp)
            out[tp.partition] = (first.offset if first else begin[tp], hw if hw is not None else begin[tp])
        return out
    finally:
        c.close()


def start_offsets(settings: Settings, from_ts_ms: int | None) -> dict[int, int]:
    """Per partition, the first offset whose record timestamp is >= from_ts_ms (None: the earliest)."""
    bounds = partition_bounds(settings)
    if from_ts_ms is None:
        return {p: lo for p, (lo, _) in bounds.items()}
    c = _consumer(settings)
    try:
        out = {}
        for p, (lo, hi) in bounds.items():
            tp = TopicPartition(settings.topic_in, p)
            c.assign([tp])
            while lo < hi:  # the first offset in [lo, hi) whose record has timestamp >= T
                mid = (lo + hi) // 2
                rec = _fetch_one(c, tp, mid)  # the first record at or after mid
                if rec is None or rec.timestamp >= from_ts_ms:
                    hi = mid
                else:
                    lo = rec.offset + 1
            out[p] = lo
        return out
    finally:
        c.close()


def _create_scratch_topic(settings: Settings, name: str) -> None:
    """The backfill's output topic (kept apart from the real one), created up front with the
    settings' replication and min.insync.replicas."""
    create_topics(bootstrap_of(settings.broker), [name], partitions=settings.partitions,
                  replication=settings.topic_replication, config=settings.topic_config(),
                  security=kafka_python_security(settings))


def commit_offsets(settings: Settings, group: str, offsets: dict[int, int]) -> None:
    c = _consumer(settings, group)
    try:
        tps = {TopicPartition(settings.topic_in, p): o for p, o in offsets.items()}
        c.assign(list(tps))
        try:
            c.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in tps.items()})
        except TypeError:  # kafka-python < 2.1: no leader epoch field
            c.commit({tp: OffsetAndMetadata(o, "") for tp, o in tps.items()})
    finally:
        c.close()


def committed(settings: Settings, group: str) -> dict[int, int]:
    c = _consumer(settings, group)
    try:
        return {p: c.committed(TopicPartition(settings.topic_in, p)) or 0 for p in range(settings.partitions)}
    finally:
        c.close()


def write_env_file(path: str, values: dict[str, str]) -> None:
    """Atomic: readers see the old file or the new one, never half of it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    os.replace(tmp, p)


def run_rebuild(args: RebuildArgs, settings: Settings) -> int:
    if args.from_timestamp is None and not args.from_beginning:
        raise ConfigError("give --from-beginning or --from-timestamp T (epoch ms or ISO-8601)")
    if not args.processor and not (args.model and args.items):
        raise ConfigError("rebuild-state needs --model CKPT and --items ITEMS (the model the new state is built with)")
    from_ts = None if args.from_beginning else parse_ts(args.from_timestamp)
    app_id = args.app_id or f"{settings.app_id}-rebuild-{int(time.time())}"
    if app_id == settings.app_id:
        raise ConfigError(f"--app-id must differ from the running one ({app_id!r}): the rebuild needs a fresh table")
    data_dir = args.data_dir or f"{settings.data_dir}-{app_id}"
    scratch = args.scratch_topic or f"{settings.topic_out}.{app_id}"
    offsets = start_offsets(settings, from_ts)
    ends = {p: hi for p, (_, hi) in partition_bounds(settings).items()}
    total = sum(max(0, ends[p] - offsets[p]) for p in offsets)
    print(f"rebuild {app_id}: {total} input records from "
          f"{'the beginning' if from_ts is None else f'timestamp {from_ts}'} into {data_dir}; outputs to {scratch}")
    _create_scratch_topic(settings, scratch)
    commit_offsets(settings, app_id, offsets)
    port = free_port()
    source = ["--processor", args.processor] if args.processor else ["--model", args.model, "--items", args.items]
    cmd = worker_command("--broker", settings.broker, "--data-dir", data_dir, "--web-port", str(port),
                         "--partitions", str(settings.partitions), *source)
    env = {**os.environ, "LIVEMB_APP_ID": app_id, "LIVEMB_TOPIC_OUT": scratch, "LIVEMB_IDLE_SWEEP_S": "0",
           "LIVEMB_BROKER_KIND": settings.broker_kind, "LIVEMB_TOPIC_REPLICATION": str(settings.topic_replication),
           "LIVEMB_TOPIC_MIN_INSYNC": str(settings.topic_min_insync)}
    log_path = Path(data_dir).with_name(Path(data_dir).name + ".rebuild.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        bar = progress_bar(total=total, desc=f"rebuild {app_id}", unit="rec", interval_s=5.0)
        done = 0
        deadline = time.monotonic() + args.timeout_s
        while True:
            if proc.poll() is not None:
                raise RebuildError(f"the rebuild worker exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RebuildError(f"rebuild not caught up after {args.timeout_s:.0f}s; see {log_path}")
            pos = committed(settings, app_id)
            now = sum(max(0, min(pos[p], ends[p]) - offsets[p]) for p in offsets)
            bar.update(now - done)
            done = now
            if all(pos[p] >= ends[p] for p in offsets):
                break
            time.sleep(1.0)
        bar.close()
    finally:
        stop_process(proc, 30.0)
    values = {"LIVEMB_APP_ID": app_id, "LIVEMB_DATA_DIR": str(Path(data_dir).resolve())}
    if args.model:
        values |= {"LIVEMB_MODEL_PATH": str(Path(args.model).resolve()), "LIVEMB_ITEMS_PATH": str(Path(args.items).resolve())}
    if args.switch_file:
        write_env_file(args.switch_file, values)
        print(f"caught up; wrote {args.switch_file}: restart the workers with it to switch over")
    else:
        print("caught up; switch over by restarting the workers with " + " ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def parse_ts(text: str) -> int:
    """Epoch milliseconds, or an ISO-8601 time (UTC when no offset is given)."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--from-timestamp {text!r}: not epoch ms or ISO-8601") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)
