"""A Prometheus HTTP-API client, and a throwaway local Prometheus for tests and `livemb dashboard`.

`binaries()` finds `prometheus`/`promtool`: the project-local copy `make test` unpacks from Debian's
package (`tools/ops/get_prometheus.sh` -> `.tools/prometheus/usr/bin`), else the PATH. `LocalPrometheus`
runs one on loopback with a temp data dir and a generated scrape config, stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from livemb.core.errors import Unavailable
from livemb.stream.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
LOCAL_BIN = ROOT / ".tools" / "prometheus" / "usr" / "bin"
FETCH_SCRIPT = ROOT / "tools" / "ops" / "get_prometheus.sh"


class PrometheusError(Unavailable):
    """A Prometheus that cannot be reached, started or queried."""


@dataclass(frozen=True)
class Binaries:
    prometheus: str
    promtool: str


def binaries(fetch: bool = False) -> Binaries | None:
    """The two binaries, or None. fetch=True first runs tools/ops/get_prometheus.sh when they are missing."""

    def find() -> Binaries | None:
        found = []
        for name in ("prometheus", "promtool"):
            local = LOCAL_BIN / name
            found.append(str(local) if local.exists() else shutil.which(name))
        return Binaries(*found) if all(found) else None

    b = find()
    if b is None and fetch and FETCH_SCRIPT.exists():
        subprocess.run(["bash", str(FETCH_SCRIPT), str(LOCAL_BIN.parents[1])], check=False, timeout=600)
        b = find()
    return b


class PromAPI:
    """The few HTTP API calls we need (/api/v1/query, query_range, targets)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, **params: object) -> object:
        q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=self.timeout) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            raise PrometheusError(f"{self.url}{path}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except OSError as e:
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {e}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self._get("/api/v1/query", query=expr, time=at)["result"]

    def scalar(self, expr: str, at: float | None = None) -> float:
        """The single value of an expression that yields one series (NaN when none)."""
        res = self.query(expr, at)
        if not res:
            return float("nan")
        if len(res) > 1:
            raise PrometheusError(f"{expr!r} returned {len(res)} series, expected one")
        return float(res[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """Range matrix: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets_up(self) -> int:
        return sum(t.get("health") == "up" for t in self._get("/api/v1/targets")["activeTargets"])


def scrape_config(targets: list[str], interval_s: float, rule_files: list[str] = (), job: str = "livemb") -> str:
    """A minimal prometheus.yml (JSON is valid YAML) scraping `targets` under `job`."""
    iv = f"{interval_s:g}s"
    cfg = {
        "global": {"scrape_interval": iv, "evaluation_interval": iv, "scrape_timeout": iv},
        "rule_files": list(rule_files),
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    return json.dumps(cfg, indent=1)


class LocalPrometheus:
    """`prometheus` on 127.0.0.1 with a temp TSDB; use as a context manager (stops it by PID)."""

    def __init__(self, targets: list[str], interval_s: float = 1.0, port: int = 0, workdir: Path | None = None,
                 rule_files: list[str] = ()) -> None:
        b = binaries(fetch=True)
        if b is None:
            raise PrometheusError("no prometheus binary: run `make tools` (tools/ops/get_prometheus.sh)")
        self.binary = b.prometheus
        self.port = port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="livemb-prom-")
        self.dir = Path(workdir or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(scrape_config(targets, interval_s, [str(Path(r).resolve()) for r in rule_files]))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.api = PromAPI(self.url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        cmd = [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        self.started_at = time.time()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
