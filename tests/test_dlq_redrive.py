"""Dead letters end to end on the real broker: fixable bad events reach the DLQ with their original
key, value and headers; `livemb dlq tail --jsonl` prints them, the test fixes them, `livemb dlq
redrive --from-file` re-produces them, and the worker applies each exactly once (a second redrive
counts only duplicates). Confluent-framed events are applied like plain JSON; every DLQ record and
output carries its contract (docs/schemas/, headers)."""

from __future__ import annotations

import collections
import signal
import struct
from collections.abc import Callable

import orjson
import pytest

from livemb.stream.broker import EmbeddedBroker
from livemb.stream.contracts import dlq_schema
from livemb.stream.dlq import REASON_HEADER, DlqEntry, header
from livemb.tools.cli import main
from tests.conftest import WorkerProc, consume_all, wait_until
from tests.schema_check import errors
from tests.test_worker_integration import Outputs, setup_topics, table_counts

T0 = 1_700_000_000_000


def send(bootstrap: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    try:
        futs = [p.send("interactions", key=k, value=v, headers=h) for k, v, h in records]
        p.flush(30)
        for f in futs:
            f.get(30)
    finally:
        p.close()


def doc(user: str, i: int, **kw: object) -> bytes:
    return orjson.dumps({"user_id": user, "item_id": i, **kw})


@pytest.mark.integration
def test_fix_and_redrive_dead_letters_exactly_once(broker: EmbeddedBroker, worker_factory: Callable[..., WorkerProc],
                                                    tmp_path, capsys) -> None:
    setup_topics(broker)
    w = worker_factory()
    w.start()
    w.wait_ready()
    users = [f"user-{i}" for i in range(20)]
    good = [(u.encode(), doc(u, i, ts=T0 + i), []) for i in range(100) for u in (users[i % 20],)]
    framed = [(u.encode(), b"\x00" + struct.pack(">I", 42) + doc(u, i, ts=T0 + 500 + i), [])
              for i in range(20) for u in (users[i],)]  # Confluent wire format: applied like plain JSON
    no_ts = [(u.encode(), doc(u, 1000 + i), [("trace", f"t-{i}".encode())]) for i in range(15)
             for u in (users[i],)]  # fixable: the ts is missing
    junk = [(b"x", b"not json", []), (None, b"\xff\xfe", [("bin", b"\x00\x01")]), (b"y", b"[1]", [])]
    send(broker.bootstrap, good + framed + no_ts + junk)
    expected = collections.Counter(k.decode() for k, _, _ in good + framed)
    out = Outputs(broker.bootstrap)
    try:
        out.wait_for(dict(expected), 90, w)
        wait_until(lambda: w.metric("livemb_events_total", outcome="invalid") == len(no_ts) + len(junk), 30,
                   "invalid counted")
        assert w.metric("livemb_events_total", outcome="ok") == len(good) + len(framed)
        dlq = wait_until(lambda: (r := consume_all(broker.bootstrap, "interactions.dlq", 0.5))
                         and len(r) >= len(no_ts) + len(junk) and r, 30, "DLQ records")
        assert len(dlq) == len(no_ts) + len(junk)
        # The DLQ record is the original record + the error headers (Kafka Connect's names).
        sent = {(k, v): h for k, v, h in no_ts + junk}
        for r in dlq:
            original = sent[(r.key, r.value)]
            assert list(r.headers[:len(original)]) == original
            assert header(r.headers, "__connect.errors.topic") == "interactions"
            entry = DlqEntry(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
            assert errors(orjson.loads(orjson.dumps(entry.to_json())), dlq_schema()) == []
        reasons = collections.Counter(header(r.headers, REASON_HEADER) for r in dlq)
        assert reasons == {"missing_field:ts": 15, "not_json": 2, "not_object": 1}
        assert sum(w.metric("livemb_dlq_total", reason=r) for r in reasons) == len(dlq)
        recs = consume_all(broker.bootstrap, "recommendations", 0.5)
        assert recs and all(dict(r.headers) == {"schema_version": b"1", "content-type": b"application/json"}
                            for r in recs)

        # dlq tail: the text form, then the JSON lines of one reason, fixed by the test.
        capsys.readouterr()
        assert main(["dlq", "tail", "--broker", broker.url, "-n", "2", "--idle-s", "1"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and all(" from interactions[" in line and " key=" in line for line in lines)
        assert main(["dlq", "tail", "--broker", broker.url, "--reason", "missing_field:ts", "-n", "0", "--jsonl",
                     "--idle-s", "1"]) == 0
        docs = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(docs) == len(no_ts) and all(d["error"]["reason"] == "missing_field:ts" for d in docs)
        for i, d in enumerate(docs):
            d["value"] = orjson.dumps({**orjson.loads(d["value"]), "ts": T0 + 10_000 + i}).decode()
        fixed = tmp_path / "fixed.jsonl"
        fixed.write_bytes(b"\n".join(orjson.dumps(d) for d in docs) + b"\n")

        assert main(["dlq", "redrive", "--broker", broker.url, "--reason", "not_json", "--dry-run",
                     "--idle-s", "1"]) == 0
        assert "would redrive 2 record(s)" in capsys.readouterr().out  # nothing sent
        assert main(["dlq", "redrive", "--broker", broker.url, "--from-file", str(fixed)]) == 0
        assert f"redriven {len(no_ts)} record(s) into interactions" in capsys.readouterr().out
        expected.update(k.decode() for k, _, _ in no_ts)
        out.wait_for(dict(expected), 60, w)
        applied = len(good) + len(framed) + len(no_ts)
        wait_until(lambda: w.metric("livemb_events_total", outcome="ok") == applied, 30, "redriven applied")
        # Again: the same fixed events are now in the dedupe memory: all duplicates, nothing applied.
        assert main(["dlq", "redrive", "--broker", broker.url, "--from-file", str(fixed)]) == 0
        wait_until(lambda: w.metric("livemb_events_total", outcome="duplicate") == len(no_ts), 60, "duplicates")
        assert w.metric("livemb_events_total", outcome="ok") == applied
        assert w.metric("livemb_events_total", outcome="invalid") == len(no_ts) + len(junk)
        assert out.poll() == dict(expected)
        redriven = [r for r in consume_all(broker.bootstrap, "interactions", 0.5)
                    if header(r.headers, "livemb-redriven-from")]
        assert len(redriven) == 2 * len(no_ts)
        assert all(header(r.headers, "trace") and not header(r.headers, REASON_HEADER) for r in redriven)
        print(f"redrive: in {len(good) + len(framed) + len(no_ts) + len(junk)}, DLQ'd {len(dlq)}, "
              f"redriven {len(no_ts)} (twice), applied {applied} (of which redriven {len(no_ts)}), "
              f"duplicates {w.metric('livemb_events_total', outcome='duplicate'):.0f}")
    finally:
        out.close()
    assert w.stop(signal.SIGTERM) == 0
    assert {u: c for u, (_, c, _) in table_counts(w).items()} == dict(expected)
