"""The shadow model in the batch step (stream/shadow.py), in memory: its state rides in the same row
as the served model's, so a crash at every commit boundary leaves it as exact as the served state;
it publishes nothing to `recommendations`; its failures and refused rows stay its own."""

from __future__ import annotations

import numpy as np
import pytest

from livemb.core.settings import Settings
from livemb.state.guard import GuardState, unwrap_all, wrap
from livemb.state.record import decode, encode
from livemb.stream.batch import BatchStep
from livemb.stream.metrics import Metrics
from livemb.stream.quality import OnlineQuality
from livemb.stream.shadow import Shadow
from tests.counting import CountingProcessor
from tests.inmemory import Crash, CrashAt, CrashingStep, MemorySink, MemoryStore
from tests.test_batch_step import BATCHES, CRASHES, SETTINGS, run, stream_of


class QualityCounting(CountingProcessor):
    """The counting processor with an online-quality count: one target per event, `hit` hits at k=1."""

    def __init__(self, hit: bool) -> None:
        self.hit = hit

    def process(self, events, states):
        res = super().process(events, states)
        q = OnlineQuality()
        q.targets[0] = len(events)
        q.hits[:, 0, 0] = len(events) if self.hit else 0
        res.quality = q
        return res


class Failing(CountingProcessor):
    def process(self, events, states):
        raise RuntimeError("challenger bug")


def step_with(store, sink, shadow=None, crash=None, processor=None, metrics=None) -> BatchStep:
    if crash is not None:
        return CrashingStep(SETTINGS, processor or CountingProcessor(), store, sink, metrics, crash=crash, shadow=shadow)
    return BatchStep(SETTINGS, processor or CountingProcessor(), store, sink, metrics, shadow=shadow)


def counts(store: MemoryStore) -> dict[str, tuple[int, int | None]]:
    """user -> (served count, shadow count or None)."""
    out = {}
    for (_, user), row in store.rows.items():
        _, inner, shadow = unwrap_all(row, SETTINGS.dedupe_memory)
        out[user] = (int(decode(inner)[1]["count"]), None if shadow is None else int(decode(shadow)[1]["count"]))
    return out


def uninterrupted_with_shadow() -> dict:
    journal: list = []
    store = MemoryStore(journal)
    step = step_with(store, MemorySink(journal), Shadow(CountingProcessor()))
    for b in BATCHES:
        run(step, stream_of()[b])
    return store.rows


@pytest.mark.parametrize("crash", list(CRASHES), ids=str)
def test_shadow_state_exact_after_a_crash_at_every_boundary(crash: CrashAt) -> None:
    """Batch 2 dies at `crash`, the resumed worker gets batch 2 again, then batch 3: every row
    (served state, guard and shadow state) equals the uninterrupted run's byte for byte."""
    want = uninterrupted_with_shadow()
    recs = stream_of()
    journal: list = []
    store, sink = MemoryStore(journal), MemorySink(journal)
    run(step_with(store, sink, Shadow(CountingProcessor())), recs[BATCHES[0]])
    crash_sink = MemorySink(journal, crash)
    crash_sink.records = sink.records
    store.arm(crash)
    with pytest.raises(Crash):
        run(step_with(store, crash_sink, Shadow(CountingProcessor()), crash=crash), recs[BATCHES[1]])
    store.arm(None)
    resumed = step_with(store, MemorySink(journal), Shadow(CountingProcessor()))
    for b in BATCHES[1:]:
        run(resumed, recs[b])
    assert store.rows == want
    assert counts(store) == {f"u{u}": (6, 6) for u in range(4)}


def test_shadow_publishes_nothing_unless_asked() -> None:
    recs = stream_of()
    journal: list = []
    quiet, loud = MemorySink(journal), MemorySink(journal)
    run(step_with(MemoryStore(journal), quiet, Shadow(CountingProcessor())), recs)
    run(step_with(MemoryStore(journal), loud, Shadow(CountingProcessor(), "recommendations.shadow")), recs)
    assert {r.topic for r in quiet.records} == {"recommendations"}
    assert len(quiet.on("recommendations")) == 4
    assert [r.key for r in loud.on("recommendations.shadow")] == [r.key for r in loud.on("recommendations")]
    assert Settings(shadow_model_path="x.pt", shadow_publish=True).topic_shadow == "recommendations.shadow"


def test_shadow_steps_after_the_served_messages_are_acked_and_before_the_write() -> None:
    """The served messages never wait for the shadow; the shadow's are acked before the row is written."""
    journal: list = []
    sink = MemorySink(journal)
    run(step_with(MemoryStore(journal), sink, Shadow(CountingProcessor(), "recommendations.shadow")), stream_of()[:8])
    assert journal == [("ack", "recommendations")] * 4 + [("ack", "recommendations.shadow")] * 4 + [
        ("put", f"u{u}") for u in range(4)]


def test_shadow_settings_need_a_shadow_model() -> None:
    from livemb.core.errors import ConfigError
    from livemb.core.settings import load_settings

    with pytest.raises(ConfigError, match="shadow_model_path"):
        load_settings(shadow_items_path="x.npz")
    with pytest.raises(ConfigError, match="shadow_model_path"):
        load_settings(shadow_publish=True)
    assert Shadow.from_settings(Settings()) is None
    with pytest.raises(ConfigError, match="--shadow-items"):
        Shadow.from_settings(Settings(shadow_model_path="x.pt"))


def test_shadow_failure_leaves_the_served_batch_alone_and_starts_its_users_over() -> None:
    recs = stream_of()
    journal: list = []
    store, sink = MemoryStore(journal), MemorySink(journal)
    metrics = Metrics()
    run(step_with(store, sink, Shadow(CountingProcessor()), metrics=metrics), recs[BATCHES[0]])
    report = run(step_with(store, sink, Shadow(Failing()), metrics=metrics), recs[BATCHES[1]])
    assert report.counts["ok"] == 8 and len(sink.on("recommendations")) == 8
    assert counts(store) == {f"u{u}": (4, None) for u in range(4)}  # the shadow blob is dropped, not left stale
    run(step_with(store, sink, Shadow(CountingProcessor()), metrics=metrics), recs[BATCHES[2]])
    assert counts(store) == {f"u{u}": (6, 2) for u in range(4)}  # started over at the next event
    assert metrics.registry.get_sample_value("livemb_shadow_failures_total") == 1


def test_refused_shadow_blob_is_started_over_and_no_shadow_drops_it() -> None:
    recs = stream_of(n_users=2, per_user=2)
    journal: list = []
    store = MemoryStore(journal)
    foreign = encode({"other": np.zeros(3, np.float32)}, {})  # another model's state
    counting = encode({"hist": np.zeros(1, np.int64)}, {"count": 5, "last_ts": 0})
    store.rows[(0, "u0")] = wrap(GuardState(SETTINGS.dedupe_memory), counting, foreign)
    metrics = Metrics()
    run(step_with(store, MemorySink(journal), Shadow(CountingProcessor()), metrics=metrics), recs[:2])
    assert counts(store) == {"u0": (6, 1), "u1": (1, 1)}
    assert metrics.registry.get_sample_value("livemb_shadow_restarts_total") == 1
    run(step_with(store, MemorySink(journal)), recs[2:3])  # a worker without a shadow touches u0 only
    assert counts(store) == {"u0": (7, None), "u1": (1, 1)}


def test_online_metrics_carry_the_model_label() -> None:
    recs = stream_of()
    journal: list = []
    metrics = Metrics()
    metrics.enable_shadow()
    run(step_with(MemoryStore(journal), MemorySink(journal), Shadow(QualityCounting(hit=False)),
                  processor=QualityCounting(hit=True), metrics=metrics), recs)

    def value(name: str, model: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, {"event_type": "click", "model": model, **labels})

    for model in ("champion", "shadow"):
        assert value("livemb_online_targets_total", model) == 24
    assert value("livemb_online_hits_total", "champion", k="10", source="repeat") == 24
    assert value("livemb_online_hits_total", "shadow", k="10", source="repeat") == 0
    # bounded: 2 models x (5 event types x (1 target + 1 rr + 4 k x 2 sources)) series
    n = sum(1 for f in metrics.registry.collect() if f.name.startswith("livemb_online_")
            for x in f.samples if x.name.endswith("_total"))
    assert n == 2 * 5 * (2 + 8)
    assert Metrics().registry.get_sample_value(
        "livemb_online_targets_total", {"event_type": "click", "model": "shadow"}) is None  # no shadow, no series


def test_row_without_a_shadow_is_unchanged() -> None:
    """A row written without a shadow is byte for byte the envelope of before shadows existed."""
    g = GuardState(4)
    assert wrap(g, b"abc") == wrap(g, b"abc", None)
    assert unwrap_all(wrap(g, b"abc"), 4)[2] is None
    with_shadow = wrap(g, b"abc", b"defgh")
    assert unwrap_all(with_shadow, 4)[1:] == (b"abc", b"defgh")
    assert len(with_shadow) - len(wrap(g, b"abc")) == 5 + 16  # the blob + its field header
