"""Fixtures for the integration tests: a real Tansu broker and worker subprocesses, all by PID."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from livemb.stream.broker import EmbeddedBroker, free_port
from livemb.tools.harness import EMBEDDED_WORKER_ENV, http_get, worker_command

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3 loads its protocol schemas with deprecated importlib.resources calls.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:kafka.protocol.schemas.load_json")
    config.addinivalue_line("filterwarnings", "ignore:.*is deprecated. Use files:DeprecationWarning")


@pytest.fixture(autouse=True)
def _same_random_start() -> None:
    """Every test starts from the same global RNG state, whatever ran before it in the process:
    a model built without its own seed (initial weights from torch's global generator) then
    trains the same in CI's full run as in a single test's rerun."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `pred` until truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class WorkerProc:
    """`livemb worker` with the counting processor in a subprocess, own data dir and HTTP port."""

    def __init__(self, broker: EmbeddedBroker, data_dir: Path, log_dir: Path, partitions: int = 4) -> None:
        self.broker, self.data_dir, self.log_dir = broker, data_dir, log_dir
        self.partitions = partitions
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"worker-{self.runs}.log"

    def start(self, batch_max_events: int = 256, processor: str = "tests.counting:make_processor",
              env: dict[str, str] | None = None) -> WorkerProc:
        """`env`: LIVEMB_* settings without a flag (the caller's own LIVEMB_* are never inherited)."""
        self.runs += 1
        self.port = free_port()
        cmd = worker_command(
            "--processor", processor,
            "--broker", self.broker.url, "--data-dir", str(self.data_dir),
            "--web-port", str(self.port), "--partitions", str(self.partitions),
            "--batch-max-events", str(batch_max_events), "--loglevel", "info",
        )  # fmt: skip
        child_env = ({k: v for k, v in os.environ.items() if not k.startswith("LIVEMB_")} | EMBEDDED_WORKER_ENV
                     | (env or {}))
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT
        )
        return self

    def http(self, path: str) -> tuple[int, bytes]:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 90.0) -> float:
        t0 = time.monotonic()

        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"worker exited early:\n{self.log_tail()}")
            return self.http("/readyz")[0] == 200

        wait_until(ready, timeout, f"worker /readyz (log tail:\n{self.log_tail()})")
        return time.monotonic() - t0

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, body = self.http("/metrics")
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the worker's PID; SIGKILL if it is still alive after `timeout`."""
        p = self.proc
        if p is None or p.poll() is not None:
            return p.returncode if p else 0
        p.send_signal(sig)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait(10)

    def read_table(self) -> dict[str, tuple[int, bytes]]:
        """Offline read of the stopped worker's RocksDB table: user -> (db partition, envelope)."""
        from rocksdict import AccessType, Rdict

        out: dict[str, tuple[int, bytes]] = {}
        for db_path in sorted(self.data_dir.glob("v*/tables/user_state-*.db")):
            part = int(db_path.name.split("-")[-1].split(".")[0])
            db = Rdict(str(db_path), access_type=AccessType.read_only())
            try:
                for k, v in db.items():
                    if isinstance(k, bytes) and not k.startswith(b"__faust"):
                        out[k.decode()] = (part, v)
            finally:
                db.close()
        return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(data_dir=tmp_path / "tansu").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def worker_factory(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    made: list[WorkerProc] = []

    def make(name: str = "w", partitions: int = 4) -> WorkerProc:
        w = WorkerProc(broker, tmp_path / name, tmp_path, partitions)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop(signal.SIGKILL, timeout=5)


def produce(bootstrap: str, messages: list[tuple[bytes | None, bytes]], topic: str = "interactions") -> list[int]:
    """Produce (key, value) messages in order; returns each message's partition."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    try:
        futs = [p.send(topic, key=k, value=v) for k, v in messages]
        p.flush(30)
        return [f.get(30).partition for f in futs]
    finally:
        p.close()


def consume_all(bootstrap: str, topic: str, idle_s: float = 1.0) -> list[Any]:
    """Every record currently in `topic` (reads until `idle_s` without new data)."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        consumer_timeout_ms=int(idle_s * 1000), group_id=None,
    )  # fmt: skip
    try:
        return list(c)
    finally:
        c.close()


def event(user: str, item: int | str, ts: int, **extra: Any) -> tuple[bytes, bytes]:
    return user.encode(), orjson.dumps({"user_id": user, "item_id": item, "ts": ts, **extra})
