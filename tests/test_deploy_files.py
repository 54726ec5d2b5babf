"""The shipped Grafana dashboard and Prometheus alert rules only reference metrics the worker exports.

A renamed metric in stream/metrics.py must fail here rather than leave an empty dashboard panel or
an alert that can never fire.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from livemb.core.settings import Settings
from livemb.stream.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "livemb-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "livemb-alerts.yml"
DOCKERFILE = ROOT / "Dockerfile"

METRIC_RE = re.compile(r"\blivemb_[A-Za-z0-9_:]*")
# SPEC section 8: every one of these must be on the dashboard.
SPEC_FAMILIES = (
    "livemb_events_total",
    "livemb_event_to_publish_seconds_bucket",
    "livemb_ingest_to_publish_seconds_bucket",
    "livemb_batch_size_bucket",
    "livemb_model_step_seconds_bucket",
    "livemb_topk_seconds_bucket",
    "livemb_sessions_started_total",
    "livemb_consumer_lag",
    "livemb_users_in_state",
    "livemb_model_info",
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every sample name the worker's registry can export.

    Labelled metrics without children (consumer_lag, model_info, dlq_total before the first DLQ
    message) have no samples yet, so the names prometheus_client derives from each family's type
    are added to the samples actually collected.
    """
    names: set[str] = set()
    for fam in Metrics().registry.collect():
        names.update(s.name for s in fam.samples)
        names.update(fam.name + sfx for sfx in _SUFFIXES.get(fam.type, ("",)))
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))  # collapsed rows nest their panels

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            exprs.append(q)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def referenced(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC_RE.findall(e)}


def test_exported_names_include_unlabelled_and_childless_metrics():
    names = exported_names()
    assert {"livemb_events_total", "livemb_event_to_publish_seconds_bucket", "livemb_consumer_lag"} <= names
    assert {"livemb_model_info", "livemb_dlq_total", "livemb_ready"} <= names


def test_dashboard_is_valid_and_uses_the_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] == 39
    var_names = [v["name"] for v in dash["templating"]["list"]]
    assert "DS_PROMETHEUS" in var_names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_dashboard_metrics_are_exported():
    used = referenced(dashboard_exprs())
    missing = used - exported_names()
    assert not missing, f"dashboard references metrics stream.metrics does not export: {sorted(missing)}"
    not_shown = set(SPEC_FAMILIES) - used
    assert not not_shown, f"SPEC section 8 metrics missing from the dashboard: {sorted(not_shown)}"


def test_alert_rules_are_well_formed_and_their_metrics_exported():
    rules = alert_rules()
    assert len(rules) >= 6
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for r in rules:
        assert r["expr"].strip() and r["labels"]["severity"] and r["annotations"]["summary"], r["alert"]
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", "0s"))), r["alert"]
    used = referenced([r["expr"] for r in rules])
    missing = used - exported_names()
    assert not missing, f"alert rules reference metrics stream.metrics does not export: {sorted(missing)}"
    assert {"livemb_event_to_publish_seconds_bucket", "livemb_consumer_lag", "livemb_ready"} <= used


def test_dockerfile_exposes_the_metrics_port():
    text = DOCKERFILE.read_text()
    port = Settings.model_fields["web_port"].default
    assert re.search(rf"^EXPOSE\s+{port}\b", text, re.M), f"Dockerfile must EXPOSE web_port {port}"
    assert "/healthz" in text


RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/livemb/livemb/blob/main/docs/RUNBOOK.md#"  # the form docs/RUNBOOK.md documents


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces to
    hyphens (code fences skipped: a '#' comment in a shell block is no heading)."""
    out: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            assert slug not in out, f"two headings give the anchor #{slug}"
            out.add(slug)
    return out


def test_github_anchors() -> None:
    assert github_anchors("# Runbook\n## DLQ spike\n```\n# not a heading\n```\n### Model rollout and rollback\n"
                          "## Input retention and `rebuild-state`") == {
        "runbook", "dlq-spike", "model-rollout-and-rollback", "input-retention-and-rebuild-state"}


def test_every_alert_has_a_runbook_url_into_the_runbook():
    anchors = github_anchors(RUNBOOK.read_text())
    for r in alert_rules():
        url = r["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_URL), f"{r['alert']}: runbook_url {url!r} is not {RUNBOOK_URL}<anchor>"
        assert url[len(RUNBOOK_URL):] in anchors, f"{r['alert']}: docs/RUNBOOK.md has no section #{url[len(RUNBOOK_URL):]}"
    assert RUNBOOK_URL in RUNBOOK.read_text(), "docs/RUNBOOK.md documents the runbook_url form"


def test_runbook_links_within_itself_resolve():
    text = RUNBOOK.read_text()
    anchors = github_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and set(links) <= anchors, f"broken in-page links: {sorted(set(links) - anchors)}"
