"""A real Prometheus (Debian's 2.42, unpacked by tools/ops/get_prometheus.sh) against the shipped files
and a real worker.

- `promtool check rules` / `check config` on deploy/prometheus/;
- `promtool test rules` on tests/prometheus/livemb-alerts.test.yml: every alert has a case;
- integration: Prometheus scrapes a worker on loopback every 1 s while clicks are produced at a
  fixed rate; PromQL over the HTTP API gives that rate, the exact event count, and the same p99 of
  livemb_event_to_publish_seconds as the worker's own histogram.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
import yaml

from livemb.stream.metrics import summarize_histogram
from livemb.tools.ops.dashboard import run_dashboard
from livemb.tools.ops.prom import LocalPrometheus, binaries
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(p for p in PROM_DIR.glob("*.yml") if p.name != "prometheus.yml")
ALERT_TESTS = ROOT / "tests" / "prometheus" / "livemb-alerts.test.yml"


@pytest.fixture(scope="module")
def bins():
    b = binaries(fetch=True)
    if b is None:
        pytest.skip("no prometheus/promtool: tools/ops/get_prometheus.sh could not fetch Debian's package here")
    return b


def promtool(bins, *args: str) -> str:
    r = subprocess.run([bins.promtool, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def test_rule_files_pass_promtool_check_rules(bins):
    assert RULE_FILES, "no rule files in deploy/prometheus"
    out = promtool(bins, "check", "rules", *map(str, RULE_FILES))
    assert "SUCCESS" in out


def test_shipped_scrape_config_passes_promtool_check_config(bins):
    out = promtool(bins, "check", "config", str(PROM_DIR / "prometheus.yml"))
    assert "is valid prometheus config file syntax" in out


def test_every_alert_has_a_unit_test_and_they_pass(bins):
    alerts = {r["alert"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
              if "alert" in r}
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {a["alertname"] for c in cases for a in c["alert_rule_test"] if a.get("exp_alerts")}
    silent = {a["alertname"] for c in cases for a in c["alert_rule_test"] if not a.get("exp_alerts")}
    assert alerts - fired == set(), f"alerts without a firing test case: {sorted(alerts - fired)}"
    required = {"LivembConsumerLagGrowing", "LivembInvalidOrDLQRatioHigh", "LivembEventToPublishP99High",
                "LivembWorkerDown", "LivembRecoveryStuck", "LivembModelNotLoaded"}
    assert required <= alerts
    assert required <= silent, f"alerts without a stays-silent case: {sorted(required - silent)}"
    out = promtool(bins, "test", "rules", str(ALERT_TESTS))
    assert "SUCCESS" in out and "FAILED" not in out


def test_promtool_test_rules_catches_a_wrong_threshold(bins, tmp_path):
    """The alert tests can fail: raise the DLQ threshold to 50 % and they must."""
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "prometheus").mkdir(parents=True)
    rules = (PROM_DIR / "livemb-alerts.yml").read_text().replace("> 0.05", "> 0.5")
    (tmp_path / "deploy" / "prometheus" / "livemb-alerts.yml").write_text(rules)
    (tmp_path / "tests" / "prometheus" / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    r = subprocess.run([bins.promtool, "test", "rules", str(tmp_path / "tests" / "prometheus" / ALERT_TESTS.name)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "LivembInvalidOrDLQRatioHigh" in r.stdout + r.stderr


RATE = 100.0  # clicks per second
SECONDS = 20.0


@pytest.mark.integration
def test_real_prometheus_scrapes_a_worker_during_a_replay(bins, broker, worker_factory, tmp_path):
    broker.create_topics(["interactions", "recommendations"], partitions=4)
    broker.create_topics(["interactions.dlq"], partitions=1)
    w = worker_factory("w").start()
    w.wait_ready()
    with LocalPrometheus([f"127.0.0.1:{w.port}"], interval_s=1.0, workdir=tmp_path / "prom") as prom:
        wait_until(lambda: prom.api.targets_up() == 1, 30, f"the worker target up ({prom.log_tail()})")
        n = int(RATE * SECONDS)
        t_start = time.time()
        sender = threading.Thread(target=_clicks_at_rate, args=(broker.bootstrap, n, RATE))
        sender.start()
        sender.join(SECONDS + 60)
        t_end = time.time()
        wait_until(lambda: w.metric("livemb_events_total", outcome="ok") == n, 60, "the worker counted every click")
        own = w.metric("livemb_events_total", outcome="ok")
        # one more scrape after the last event, then read back
        wait_until(lambda: prom.api.scalar('sum(livemb_events_total{job="livemb",outcome="ok"})') == n, 15,
                   "Prometheus has the final count")
        _, body = w.http("/metrics")
        worker_p99 = _p99_from_text(body.decode())

        api = prom.api
        rate_q = 'sum(rate(livemb_events_total{job="livemb",outcome="ok"}[5s]))'
        series = api.query_range(rate_q, t_start + 6, t_end - 1, 1)
        rates = [float(v) for _, v in series[0]["values"]]
        med = statistics.median(rates)
        p99_q = 'histogram_quantile(0.99, sum by (le) (livemb_event_to_publish_seconds_bucket{job="livemb"}))'
        p99 = api.scalar(p99_q)
        p99_5m = api.scalar('histogram_quantile(0.99, sum by (le) '
                            '(rate(livemb_event_to_publish_seconds_bucket{job="livemb"}[1m])))')
        png = tmp_path / "dash.png"
        counts = run_dashboard(prom.url, str(png), start=t_start - 5, end=time.time(), step_s=1.0, window="5s")
        print(f"\nPromQL {rate_q} over the replay: median {med:.1f}/s (min {min(rates):.1f}, max {max(rates):.1f}, "
              f"{len(rates)} steps); sent at {RATE:.0f}/s")
        print(f"PromQL {p99_q} = {p99:.4f} s; worker's own histogram p99 = {worker_p99:.4f} s; "
              f"p99 over rate(...[1m]) = {p99_5m:.4f} s; events counted {own:.0f} of {n}")
    assert own == n
    assert abs(med - RATE) / RATE < 0.25, f"median scraped rate {med:.1f}/s vs {RATE}/s sent: {rates}"
    assert p99 == pytest.approx(worker_p99, rel=1e-6), (p99, worker_p99)
    assert 0 < p99 < 5.0  # fresh wall-clock events on loopback: well under the 1 s alert target
    # livemb dashboard from the same Prometheus: every panel has data (the counting processor
    # has no model, so the model-step and the online quality panels stay empty), the PNG is written
    assert png.stat().st_size > 20_000
    empty = {t for t, n in counts.items() if n == 0}
    assert empty <= {"model step / top-K time", "live recall@10: champion vs shadow", "live MRR: champion vs shadow"}, counts


def test_dashboard_cli_reports_an_unreachable_prometheus(capsys):
    from livemb.stream.broker import free_port
    from livemb.tools.cli import main

    rc = main(["dashboard", "--prometheus", f"http://127.0.0.1:{free_port()}", "--out", "/tmp/never.png"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot reach Prometheus" in err and "Traceback" not in err


def _clicks_at_rate(bootstrap: str, n: int, rate: float) -> None:
    """n clicks for 50 users stamped with the wall clock, paced to `rate` per second."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
    t0 = time.perf_counter()
    try:
        for k in range(n):
            u = f"u{k % 50}"
            doc = {"user_id": u, "item_id": k % 97, "ts": int(time.time() * 1000), "event_id": f"e{k}"}
            p.send("interactions", key=u.encode(), value=orjson.dumps(doc))
            ahead = (k + 1) / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        p.flush(30)
    finally:
        p.close()


def _p99_from_text(text: str) -> float:
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    class _Reg(CollectorRegistry):
        def collect(self):  # the parsed families, for summarize_histogram
            return text_string_to_metric_families(text)

    return summarize_histogram(_Reg(), "livemb_event_to_publish_seconds")["p99_s"]
