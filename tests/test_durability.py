"""Topic durability settings: replication, min.insync.replicas, acks=all and the recovery
consistency check, for a Kafka cluster (the defaults) and for the embedded broker (1/1, check off).
What Faust is told is checked on the app object; the integration tests run the embedded values."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from livemb.core.settings import Settings, load_settings
from livemb.stream.app import faust_config, log_durability, make_app
from livemb.stream.metrics import Metrics
from livemb.tools.harness import EMBEDDED_WORKER_ENV
from tests.counting import make_processor


def test_defaults_suit_a_three_broker_cluster() -> None:
    s = Settings()
    assert (s.broker_kind, s.topic_replication, s.topic_min_insync) == ("kafka", 3, 2)
    cfg = faust_config(s)
    assert cfg["topic_replication_factor"] == 3
    assert cfg["producer_acks"] == -1  # acks=all
    assert cfg["recovery_consistency_check"] is True
    assert cfg["topic_disable_leader"] is True  # the changelog is the only topic the worker creates
    assert s.topic_config() == {"min.insync.replicas": "2"}


def test_embedded_broker_defaults_to_one_copy_and_no_consistency_check(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in EMBEDDED_WORKER_ENV.items():  # what the harness and the test fixtures give a worker
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert (s.broker_kind, s.topic_replication, s.topic_min_insync) == ("embedded", 1, 1)
    cfg = faust_config(s)
    assert cfg["recovery_consistency_check"] is False and cfg["topic_replication_factor"] == 1
    assert cfg["producer_acks"] == -1


def test_explicit_values_win_over_the_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMB_TOPIC_REPLICATION", "2")
    s = load_settings(broker_kind="embedded")
    assert (s.topic_replication, s.topic_min_insync) == (2, 1)
    s = Settings(topic_replication=1, topic_min_insync=1)  # e.g. a one-broker Kafka (deploy/docker-compose.yml)
    assert s.broker_kind == "kafka" and faust_config(s)["recovery_consistency_check"] is True


def test_min_insync_above_replication_is_refused() -> None:
    with pytest.raises(ValidationError, match="topic_min_insync 3 > topic_replication 2"):
        Settings(topic_replication=2, topic_min_insync=3)
    with pytest.raises(ValidationError, match="topic_min_insync 2 > topic_replication 1"):
        Settings(topic_replication=1)  # the default min ISR 2 does not fit one replica


@pytest.mark.parametrize(("kw", "replicas", "min_isr"), [({}, 3, "2"), ({"broker_kind": "embedded"}, 1, "1"),
                                                          ({"topic_replication": 5, "topic_min_insync": 3}, 5, "3")])
def test_the_changelog_topic_carries_the_settings(tmp_path, kw, replicas, min_isr) -> None:
    s = Settings(data_dir=str(tmp_path), **kw)
    app = make_app(s, make_processor(s), Metrics())
    changelog = app.tables["user_state"].changelog_topic
    assert changelog.config == {"min.insync.replicas": min_isr}
    assert (changelog.replicas or app.conf.topic_replication_factor) == replicas  # what Topic.declare uses
    assert app.conf.producer_acks == -1
    assert app.conf.recovery_consistency_check is (s.broker_kind == "kafka")


def test_fewer_brokers_than_replicas_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="livemb.worker"):
        log_durability(Settings(), brokers=3)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        log_durability(Settings(), brokers=1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 broker(s) but LIVEMB_TOPIC_REPLICATION=3" in warned[0]
