"""Every input rule of SPEC section 2, without a broker."""

from __future__ import annotations

import base64
import struct

import orjson
import pytest

import livemb.stream.validate
from livemb.core.outcomes import DlqReason
from livemb.core.settings import Settings
from livemb.stream.dlq import DlqEntry, dead_letter, reason_message, redrive_headers
from livemb.stream.validate import Invalid, ValidEvent, derive_event_id, too_late, validate

NOW = 1_700_000_000_000
S = Settings()


def check(doc: object, key: bytes | None = None, raw: bytes | None = None) -> ValidEvent | Invalid:
    data = raw if raw is not None else orjson.dumps(doc)
    return validate(data, "interactions", 2, 41, NOW, S, key=key)


def reason(doc: object, **kw: object) -> str:
    r = check(doc, **kw)  # type: ignore[arg-type]
    assert isinstance(r, Invalid), r
    return r.reason


def test_valid_minimal_defaults() -> None:
    ev = check({"user_id": "u1", "item_id": "i9", "ts": NOW - 5})
    assert isinstance(ev, ValidEvent)
    assert (ev.user_id, ev.item_id, ev.ts, ev.event_type) == ("u1", "i9", NOW - 5, "click")
    assert (ev.partition, ev.offset, ev.topic) == (2, 41, "interactions")
    assert ev.event_id == derive_event_id("u1", "i9", NOW - 5)


def test_integer_ids_normalised_to_str() -> None:
    ev = check({"user_id": 42, "item_id": 7, "ts": NOW})
    assert isinstance(ev, ValidEvent) and (ev.user_id, ev.item_id) == ("42", "7")


def test_explicit_event_id_and_type() -> None:
    ev = check({"user_id": "u", "item_id": "i", "ts": NOW, "event_id": "e-1", "event_type": "buy"})
    assert isinstance(ev, ValidEvent) and (ev.event_id, ev.event_type) == ("e-1", "buy")


def test_derived_event_id_is_deterministic_and_distinct() -> None:
    a = derive_event_id("u", "i", 1)
    assert a == derive_event_id("u", "i", 1)
    assert len({a, derive_event_id("u", "i", 2), derive_event_id("u", "j", 1), derive_event_id("v", "i", 1)}) == 4


@pytest.mark.parametrize(
    "ts,expected",
    [
        ("2023-11-14T22:13:20Z", 1_700_000_000_000),
        ("2023-11-14T22:13:20.250+00:00", 1_700_000_000_250),
        ("2023-11-14T23:13:20+01:00", 1_700_000_000_000),
        ("2023-11-14T22:13:20", 1_700_000_000_000),  # naive = UTC
    ],
)
def test_iso_ts(ts: str, expected: int) -> None:
    ev = check({"user_id": "u", "item_id": "i", "ts": ts})
    assert isinstance(ev, ValidEvent) and ev.ts == expected


REJECTIONS = [
    ({"item_id": "i", "ts": NOW}, "missing_field:user_id"),
    ({"user_id": None, "item_id": "i", "ts": NOW}, "missing_field:user_id"),
    ({"user_id": "u", "ts": NOW}, "missing_field:item_id"),
    ({"user_id": "u", "item_id": "i"}, "missing_field:ts"),
    ({"user_id": True, "item_id": "i", "ts": NOW}, "bad_type:user_id"),
    ({"user_id": 1.5, "item_id": "i", "ts": NOW}, "bad_type:user_id"),
    ({"user_id": ["u"], "item_id": "i", "ts": NOW}, "bad_type:user_id"),
    ({"user_id": "u", "item_id": {"x": 1}, "ts": NOW}, "bad_type:item_id"),
    ({"user_id": "u", "item_id": False, "ts": NOW}, "bad_type:item_id"),
    ({"user_id": "", "item_id": "i", "ts": NOW}, "empty_field:user_id"),
    ({"user_id": "  ", "item_id": "i", "ts": NOW}, "empty_field:user_id"),
    ({"user_id": "u", "item_id": "", "ts": NOW}, "empty_field:item_id"),
    ({"user_id": "x" * 129, "item_id": "i", "ts": NOW}, "user_id_too_long"),
    ({"user_id": "u", "item_id": "i", "ts": True}, "bad_type:ts"),
    ({"user_id": "u", "item_id": "i", "ts": 1.7e12}, "bad_type:ts"),
    ({"user_id": "u", "item_id": "i", "ts": [1]}, "bad_type:ts"),
    ({"user_id": "u", "item_id": "i", "ts": "yesterday"}, "bad_value:ts"),
    ({"user_id": "u", "item_id": "i", "ts": -1}, "bad_value:ts"),
    ({"user_id": "u", "item_id": "i", "ts": NOW + 86_400_001}, "future_ts"),
    ({"user_id": "u", "item_id": "i", "ts": "2099-01-01T00:00:00Z"}, "future_ts"),
    ({"user_id": "u", "item_id": "i", "ts": NOW, "event_type": 3}, "bad_type:event_type"),
    ({"user_id": "u", "item_id": "i", "ts": NOW, "event_id": 3}, "bad_type:event_id"),
    ({"user_id": "u", "item_id": "i", "ts": NOW, "event_id": ""}, "empty_field:event_id"),
    ({"user_id": "u", "item_id": "i", "ts": NOW, "event_type": ""}, "empty_field:event_type"),
    ([1, 2], "not_object"),
    ("just a string", "not_object"),
    (None, "not_object"),
]


@pytest.mark.parametrize("doc,why", REJECTIONS)
def test_rejections(doc: object, why: str) -> None:
    assert reason(doc) == why


def test_every_reason_the_validator_gives_is_a_dlq_reason_member(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reasons are a wire contract: each is a DlqReason member with its string value, and the
    validator can produce every member except the three the batch step adds (tests/test_batch_step.py)."""
    doc = {"user_id": "u", "item_id": "i", "ts": NOW}
    given = [reason(d) for d, _ in REJECTIONS]
    given += [reason(None, raw=b"{not json"), reason(None, raw=b"x" * (64 * 1024 + 1)), reason(doc, key=b"v")]

    def broken(*_: object) -> None:
        raise RecursionError("pathological nesting")

    monkeypatch.setattr(livemb.stream.validate, "_check", broken)
    given.append(reason(doc))
    assert all(type(r) is DlqReason for r in given)
    later = {DlqReason.TOO_LATE, DlqReason.STATE_UNREADABLE, DlqReason.PROCESSING_ERROR}
    assert set(given) == set(DlqReason) - later
    assert {str(r) for r in given} >= {"not_json", "oversized", "key_mismatch", "unparseable", "empty_field:event_type"}


def test_user_id_at_limit_is_fine() -> None:
    assert isinstance(check({"user_id": "x" * 128, "item_id": "i", "ts": NOW}), ValidEvent)


def test_future_within_a_day_is_fine() -> None:
    assert isinstance(check({"user_id": "u", "item_id": "i", "ts": NOW + 86_400_000}), ValidEvent)


def test_not_json_and_empty_and_none() -> None:
    assert reason(None, raw=b"{not json") == "not_json"
    assert reason(None, raw=b"") == "not_json"
    assert isinstance(validate(None, "t", 0, 0, NOW, S), Invalid)


def test_oversized_checked_before_parsing() -> None:
    raw = orjson.dumps({"user_id": "u", "item_id": "i", "ts": NOW, "pad": "x" * (64 * 1024)})
    assert reason(None, raw=raw) == "oversized"


def test_key_must_match_user() -> None:
    doc = {"user_id": "u1", "item_id": "i", "ts": NOW}
    assert isinstance(check(doc, key=b"u1"), ValidEvent)
    assert reason(doc, key=b"u2") == "key_mismatch"
    assert isinstance(check({"user_id": 5, "item_id": "i", "ts": NOW}, key=b"5"), ValidEvent)


def dlq(inv: Invalid | ValidEvent) -> DlqEntry:
    assert isinstance(inv, Invalid)
    r = dead_letter(inv, "interactions.dlq", NOW)
    return DlqEntry("interactions.dlq", 0, 0, r.key, r.value, r.headers)


def test_dlq_record_keeps_key_value_and_headers_and_adds_the_error() -> None:
    raw = b"hello \xc3\xa9"
    inv = validate(raw, "interactions", 2, 41, NOW, S, key=b"u1", headers=(("trace", b"t-1"), ("x", b"\xff")))
    e = dlq(inv)
    assert (e.key, e.value) == (b"u1", raw)
    assert e.headers[:2] == (("trace", b"t-1"), ("x", b"\xff"))  # the original ones first, in order
    assert e.error() == {"topic": "interactions", "partition": 2, "offset": 41, "reason": "not_json",
                         "message": reason_message(DlqReason.NOT_JSON), "timestamp": NOW, "schema_version": 1}
    assert dict(e.headers)["__connect.errors.exception.class.name"] == b"not_json"


def test_dlq_record_of_binary_value_and_its_json_form() -> None:
    raw = b"\xff\xfe\x00bin"
    e = dlq(check(None, raw=raw))
    doc = e.to_json()
    assert doc["value"] == {"base64": base64.b64encode(raw).decode()} and doc["key"] is None
    back = DlqEntry.from_json(orjson.loads(orjson.dumps(doc)))
    assert back == e  # the JSON form round-trips, bytes and headers included


def test_dlq_record_truncates_huge_value() -> None:
    raw = b"x" * (600 * 1024)
    e = dlq(check(None, raw=raw))
    assert e.error()["reason"] == "oversized" and e.truncated and len(e.value) == 256 * 1024
    assert e.to_json()["value_truncated"] == len(raw)


def test_every_reason_has_a_message() -> None:
    assert all(reason_message(r) for r in DlqReason)
    assert reason_message(DlqReason.MISSING_TS) == "field ts is missing"


def test_too_late_record_keeps_raw_key_and_headers() -> None:
    raw = orjson.dumps({"user_id": "u", "item_id": "i", "ts": NOW})
    ev = validate(raw, "interactions", 1, 9, NOW, S, key=b"u", headers=(("h", b"1"),))
    assert isinstance(ev, ValidEvent)
    e = dlq(too_late(ev))
    assert (e.key, e.value, e.headers[0]) == (b"u", raw, ("h", b"1"))
    assert (e.reason, e.error()["partition"], e.error()["offset"]) == ("too_late", 1, 9)


def test_redrive_headers_drop_the_error_and_name_the_source() -> None:
    e = dlq(validate(b"{", "interactions", 0, 3, NOW, S, headers=(("trace", b"t"),)))
    assert redrive_headers(e.headers, e.source) == (("trace", b"t"), ("livemb-redriven-from", b"interactions.dlq/0/0"))


def confluent(doc: object, schema_id: int = 7) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + orjson.dumps(doc)


def test_confluent_wire_format_is_read_as_its_json() -> None:
    doc = {"user_id": "u1", "item_id": "i9", "ts": NOW - 5}
    ev = check(None, raw=confluent(doc, 123456))
    assert isinstance(ev, ValidEvent) and (ev.user_id, ev.item_id, ev.ts) == ("u1", "i9", NOW - 5)
    assert ev.event_id == check(doc).event_id  # the same event as the plain JSON (dedupe works across both)
    assert reason(None, raw=confluent({"user_id": "u1", "ts": NOW})) == "missing_field:item_id"
    assert reason(None, raw=b"\x00\x00\x00\x00\x07not json") == "not_json"
    assert reason(None, raw=b"\x00\x00") == "not_json"  # too short for the framing


def test_never_raises_on_garbage() -> None:
    for raw in [b"[" * 100_000, b"\x00" * 10, b'{"user_id": "u", "item_id": "i", "ts": 1e400}', b"nan"]:
        assert isinstance(validate(raw, "t", 0, 0, NOW, S), Invalid)
