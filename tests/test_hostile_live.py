"""2,000+ generated bad payloads mixed into a live replay on the real broker: the worker stays up,
every bad one reaches the DLQ with its reason, every valid user is served, counters are exact."""

from __future__ import annotations

import collections
import random
import signal
import time
from collections.abc import Callable

import orjson
import pytest

from livemb.core.settings import Settings
from livemb.stream.broker import EmbeddedBroker
from livemb.stream.dlq import REASON_HEADER, header
from livemb.stream.validate import Invalid, validate
from tests.conftest import WorkerProc, consume_all, event, produce, wait_until
from tests.test_worker_integration import Outputs, setup_topics

T0 = 1_700_000_000_000


def bad_payloads(n: int, seed: int = 7) -> list[tuple[bytes | None, bytes]]:
    """n (key, value) pairs that the validator refuses, drawn from many kinds of hostility."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)

    def one() -> tuple[bytes | None, bytes]:
        u = f"h{rng.randrange(50)}"
        kind = rng.randrange(12)
        if kind == 0:
            return b"x", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        if kind == 1:
            return b"x", orjson.dumps(rng.choice([[1, 2], "str", 3.5, None, True, {"a": [{}]}]))
        if kind == 2:
            doc = {"user_id": u, "item_id": 1, "ts": T0}
            doc.pop(rng.choice(list(doc)))
            return u.encode(), orjson.dumps(doc)
        if kind == 3:
            return u.encode(), orjson.dumps({"user_id": u, "item_id": rng.choice([None, [], {}, 1.5, True]), "ts": T0})
        if kind == 4:
            return u.encode(), orjson.dumps({"user_id": u, "item_id": 1, "ts": rng.choice(["soon", "", -5, 2**63, 1.5])})
        if kind == 5:
            return u.encode(), orjson.dumps({"user_id": u, "item_id": 1, "ts": now + 3 * 86_400_000})
        if kind == 6:
            return b"other", orjson.dumps({"user_id": u, "item_id": 1, "ts": T0})
        if kind == 7:
            n_ = rng.randrange(100, 3000)
            return u.encode(), b"[" * n_ + b"]" * n_
        if kind == 8:
            return u.encode(), orjson.dumps({"user_id": u, "item_id": 1, "ts": T0, "pad": "p" * 70_000})
        if kind == 9:
            return u.encode(), b'{"user_id": "%s", "item_id": 1, "ts": NaN}' % u.encode()
        if kind == 10:
            long = "\x00\x1f" * 100
            return long.encode(), orjson.dumps({"user_id": long, "item_id": 1, "ts": T0})
        return u.encode(), orjson.dumps({"user_id": u, "item_id": 1, "ts": T0, "event_type": rng.choice([5, "", []])})

    settings = Settings()
    out = []
    while len(out) < n:
        k, v = one()
        if isinstance(validate(v, "interactions", 0, 0, now, settings, key=k), Invalid):
            out.append((k, v))
    return out


@pytest.mark.integration
def test_thousands_of_bad_payloads_in_a_live_replay(broker: EmbeddedBroker,
                                                    worker_factory: Callable[..., WorkerProc]) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start()
    w.wait_ready()
    users = [f"user-{i}" for i in range(300)]
    good = [event(users[i % 300], i, T0 + i * 1000) for i in range(3000)]
    bad = bad_payloads(2000)
    now = int(time.time() * 1000)
    want_reasons = collections.Counter(validate(v, "interactions", 0, 0, now, Settings(), key=k).reason for k, v in bad)
    bad_at = set(random.Random(1).sample(range(len(good) + len(bad)), len(bad)))
    g, b = iter(good), iter(bad)  # bad payloads scattered; valid events keep their order
    mixed = [next(b) if i in bad_at else next(g) for i in range(len(good) + len(bad))]
    produce(broker.bootstrap, mixed)
    expected = collections.Counter(users[i % 300] for i in range(3000))
    out = Outputs(broker.bootstrap)
    try:
        out.wait_for(dict(expected), 120, w)
        wait_until(lambda: w.metric("livemb_events_total", outcome="invalid") == len(bad), 30, "invalid counted")
        assert w.alive()
        assert w.metric("livemb_events_total", outcome="ok") == len(good)
        assert w.metric("livemb_events_total", outcome="late") == 0
        dlq = wait_until(lambda: (r := consume_all(broker.bootstrap, "interactions.dlq", 0.5)) and len(r) >= len(bad)
                         and r, 60, "DLQ records")
        assert len(dlq) == len(bad)
        assert collections.Counter(header(r.headers, REASON_HEADER) for r in dlq) == want_reasons
        # each DLQ record is the bad record itself (value cut at 256 KiB, none is that large here)
        assert collections.Counter((r.key, r.value) for r in dlq) == collections.Counter(bad)
        assert sum(w.metric("livemb_dlq_total", reason=r) for r in want_reasons) == len(bad)
    finally:
        out.close()
    assert w.stop(signal.SIGTERM) == 0
