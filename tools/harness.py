"""The process harness of `livemb demo`, `bench`, `soak` and the integration tests.

Everything it starts is a child process stopped by PID (never by name):
- `embedded_broker(settings)`: the embedded broker (Tansu) with the worker's topics created
- `worker_command`, `start_worker`, `wait_ready`, `stop_process`: `livemb worker` (the production
  entry point) as a child, waited on through /readyz, stopped with SIGTERM then SIGKILL
- `http_get`, `metric_samples`, `rss_bytes`, `cpu_seconds`: what such a process serves and uses
- `interrupt`: a SIGTERM handler that unwinds like Ctrl-C, so every `finally` stops its children
- `SmallModel`, `prepare_model`: a log and a small HierTCN trained on it once (or the given ones)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.train import TrainConfig
from livemb.stream.broker import EmbeddedBroker
from livemb.tools.args import LogFormat
from livemb.tools.data.eventlog import load_log
from livemb.tools.data.item_embeddings import items_for
from livemb.tools.data.synth import synth_log, write_log
from livemb.tools.offline.commands import train_checkpoint

# ------------------------------------------------------------------ processes


def interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so every `finally` stops the worker and broker it started."""
    raise KeyboardInterrupt


@contextmanager
def embedded_broker(settings: Settings, extra_topics: tuple[str, ...] = ()) -> Iterator[EmbeddedBroker]:
    """The embedded broker on a free loopback port with the input, output (+ `extra_topics`, all
    with `settings.partitions`) and DLQ topics; stopped (by PID) on exit."""
    with EmbeddedBroker() as broker:
        broker.create_topics([settings.topic_in, settings.topic_out, *extra_topics], partitions=settings.partitions)
        broker.create_topics([settings.topic_dlq], partitions=1)
        yield broker


# What a worker on the embedded broker is told (core/settings.py: broker_kind; topics 1 replica, 1 in sync).
EMBEDDED_WORKER_ENV = {"LIVEMB_BROKER_KIND": "embedded"}


def worker_command(*flags: str) -> list[str]:
    """`livemb worker FLAGS` run by this interpreter (the production entry point, this checkout's code)."""
    return [sys.executable, "-m", "livemb.tools.cli", "worker", *flags]


def start_worker(broker_url: str, model: str, items: str, data_dir: Path, port: int,
                 log_path: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """`livemb worker` as a child process (the production entry point) on the embedded broker at
    `broker_url` (LIVEMB_BROKER_KIND=embedded); stop it with stop_process.
    `env`: extra LIVEMB_* settings for the child (e.g. its own LIVEMB_APP_ID)."""
    cmd = worker_command(*extra, "--broker", broker_url, "--data-dir", str(data_dir), "--web-port", str(port),
                         "--model", model, "--items", items)
    logf = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **EMBEDDED_WORKER_ENV, **(env or {})})


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM by PID; SIGKILL when it is still alive after `timeout_s`."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until the process on `port` answers /readyz with 200; fails when it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {proc.returncode} before becoming ready")
        if http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"worker not ready after {timeout_s:.0f}s")


def metrics_text(port: int) -> str:
    """The /metrics page of the process on `port` ('' when nothing answers)."""
    return http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()


def metric_samples(port: int) -> Iterator[Sample]:
    """Every sample of the process's /metrics page."""
    for fam in text_string_to_metric_families(metrics_text(port)):
        yield from fam.samples


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the small model


def _demo_training() -> TrainConfig:
    return TrainConfig(epochs=3, loss="hinge", batch_size=32, lr=3e-3)


@dataclass(frozen=True)
class SmallModel:
    """The synthetic log and the HierTCN trained on it when a run is given neither (demo, soak;
    bench passes its own sizes)."""

    users: int = 200
    items: int = 400
    days: float = 7
    dim: int = 32  # planted item vectors; also the size of vectors built from a given log
    log_name: str = "synth.csv"
    train: TrainConfig = field(default_factory=_demo_training)
    train_events: int | None = None  # train on the log's first N events only
    item_vectors: str = "symmetric"  # kind built from a given log that comes without --items


@dataclass(frozen=True)
class Prepared:
    log: pd.DataFrame
    model: str
    items: str | None


def prepare_model(work: Path, settings: Settings, spec: SmallModel | None = None, *, data: str | None = None,
                  model: str | None = None, items: str | None = None,
                  log_format: LogFormat | None = None) -> Prepared:
    """The log and a checkpoint for a harness run.

    log: `data` (read with `log_format`), else `spec`'s synthetic log written to work/<log_name>
    with its planted item vectors in work/items.npz (used unless `items` is given).
    checkpoint: `model`, else HierTCN trained with `spec.train` on the log (its first
    `spec.train_events` events) and saved to work/hiertcn.pt; without item vectors from `items` or
    the synthetic log, they are built from the log and saved next to it (hiertcn.items.npz)."""
    spec = spec or SmallModel()
    if data:
        fmt = log_format or LogFormat()
        df = load_log(data, fmt.columns, fmt.ts_unit)
    else:
        df, ids, vecs = synth_log(users=spec.users, items=spec.items, days=spec.days, seed=0, dim=spec.dim)
        write_log(df, work / spec.log_name)
        planted = ItemTable(ids, vecs).save(work / "items.npz")
        items = items or str(planted)
    if model:
        return Prepared(df, model, items)
    out = work / "hiertcn.pt"
    table = items_for(df, items, spec.dim, train_only=False, kind=spec.item_vectors)
    if not items:
        items = str(table.save(out.with_suffix(".items.npz")))
    part = df if spec.train_events is None else df.iloc[: spec.train_events]
    if len(part) < len(df):
        print(f"training hiertcn {spec.train.epochs} epoch(s) on the first {len(part)} of {len(df)} events "
              f"({len(table)} items)", flush=True)
    train_checkpoint("hiertcn", part, table, out, spec.train, device=settings.resolved_device(),
                     overrides={"session_gap_ms": int(settings.session_gap_s * 1000)})
    return Prepared(df, str(out), items)
