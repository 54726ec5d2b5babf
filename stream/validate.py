"""Input validation (SPEC section 2): one raw Kafka message -> `ValidEvent` or `Invalid`.

Pure functions, no broker. The worker never raises on input: everything unexpected becomes an
`Invalid` with its `DlqReason` (core/outcomes.py); stream/dlq.py makes it the `interactions.dlq` record.
The rules are the table `INPUT_FIELDS`, which is also what the `interactions` JSON Schema is
generated from (stream/contracts.py). A value in the Confluent schema-registry wire format
(0x00 + 4-byte schema id + JSON) is read as its JSON.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from livemb.core.events import ValidEvent
from livemb.core.outcomes import DlqReason

if TYPE_CHECKING:
    from livemb.core.settings import Settings

MAX_USER_ID_CHARS = 128
MAX_TS_MS = 2**63 - 1
# Confluent schema-registry wire format: magic byte 0, a 4-byte big-endian schema id, then the
# payload (here JSON). A JSON text never starts with byte 0, so the framing is unambiguous.
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_BYTES = 5

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class InputField:
    """One field of the input event. The validator reads the fields in this order, and the
    `interactions` JSON Schema (stream/contracts.py) is generated from the same table."""

    name: str
    kind: str  # "ident": string or integer, normalised to str; "ts": epoch ms or ISO-8601; "text": string
    required: bool
    doc: str
    default: str | None = None
    max_chars: int | None = None  # longer: DlqReason "<name>_too_long"


INPUT_FIELDS = (
    InputField("user_id", "ident", True, "the user; the Kafka key must be this id's UTF-8 bytes (or absent)",
               max_chars=MAX_USER_ID_CHARS),
    InputField("item_id", "ident", True, "the item; one missing from the item table is still recorded (unknown_item)"),
    InputField("ts", "ts", True, "event time: integer epoch milliseconds, or an ISO-8601 string (naive = UTC); "
               "at most max_future_s (default 1 day) after the worker's clock"),
    InputField("event_type", "text", False, "interaction kind (click, view, cart, ...)", default="click"),
    InputField("event_id", "text", False, "dedupe id; when absent, derived from (user_id, item_id, ts)"),
)


@dataclass(frozen=True, slots=True)
class Invalid:
    """A record refused with its reason; stream.dlq turns it into the DLQ record (original key,
    value and headers + the error headers)."""

    reason: DlqReason
    topic: str
    partition: int
    offset: int
    raw: bytes = field(repr=False)
    key: bytes | None = field(default=None, repr=False)
    headers: Headers = field(default=(), repr=False)


def derive_event_id(user_id: str, item_id: str, ts: int) -> str:
    """Deterministic id for events without one, so a replayed copy is recognised as a duplicate."""
    h = hashlib.blake2b(f"{user_id}\x1f{item_id}\x1f{ts}".encode(), digest_size=12)
    return "d-" + h.hexdigest()


def unframe(raw: bytes) -> bytes:
    """The JSON of a value in the Confluent wire format (0x00 + 4-byte schema id + JSON); any other
    value unchanged. The schema id is not looked up: the payload must be the event's JSON."""
    if raw[:1] == CONFLUENT_MAGIC and len(raw) >= CONFLUENT_HEADER_BYTES:
        return raw[CONFLUENT_HEADER_BYTES:]
    return raw


class _Reject(Exception):
    def __init__(self, reason: DlqReason) -> None:
        self.reason = reason


def _ident(doc: dict[str, object], f: InputField) -> str:
    """user_id / item_id: string or integer (not bool), normalised to str."""
    name = f.name
    if name not in doc or doc[name] is None:
        raise _Reject(DlqReason.of_field("missing_field", name))
    v = doc[name]
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise _Reject(DlqReason.of_field("bad_type", name))
    s = str(v)
    if not s.strip():
        raise _Reject(DlqReason.of_field("empty_field", name))
    if f.max_chars is not None and len(s) > f.max_chars:
        raise _Reject(DlqReason(f"{name}_too_long"))
    return s


def parse_ts(v: object) -> int:
    """Epoch ms from an int or an ISO-8601 string (naive times are UTC)."""
    if isinstance(v, bool):
        raise _Reject(DlqReason.BAD_TYPE_TS)
    if isinstance(v, int):
        ms = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip())
        except ValueError:
            raise _Reject(DlqReason.BAD_VALUE_TS) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ms = int(dt.timestamp() * 1000)
    else:
        raise _Reject(DlqReason.BAD_TYPE_TS)
    if ms < 0 or ms > MAX_TS_MS:
        raise _Reject(DlqReason.BAD_VALUE_TS)
    return ms


def _ts(doc: dict[str, object], f: InputField) -> int:
    if f.name not in doc or doc[f.name] is None:
        raise _Reject(DlqReason.of_field("missing_field", f.name))
    return parse_ts(doc[f.name])


def _text(doc: dict[str, object], f: InputField) -> str | None:
    v = doc.get(f.name)
    if v is None:
        return f.default
    if not isinstance(v, str):
        raise _Reject(DlqReason.of_field("bad_type", f.name))
    if not v:
        raise _Reject(DlqReason.of_field("empty_field", f.name))
    return v


_READ = {"ident": _ident, "ts": _ts, "text": _text}


def _check(raw: bytes, key: bytes | None, now_ms: int, settings: Settings) -> tuple[str, str, int, str, str]:
    if len(raw) > settings.max_payload_bytes:
        raise _Reject(DlqReason.OVERSIZED)
    try:
        doc = orjson.loads(unframe(raw))
    except orjson.JSONDecodeError:
        raise _Reject(DlqReason.NOT_JSON) from None
    if not isinstance(doc, dict):
        raise _Reject(DlqReason.NOT_OBJECT)
    v = {}
    for f in INPUT_FIELDS:  # in order: the first failing field gives the reason
        v[f.name] = _READ[f.kind](doc, f)
        if f.kind == "ts" and v[f.name] > now_ms + int(settings.max_future_s * 1000):
            raise _Reject(DlqReason.FUTURE_TS)
    user_id, item_id, ts = v["user_id"], v["item_id"], v["ts"]
    # Per-user offsets and changelog partitions assume key = user_id (SPEC 1); a message keyed
    # otherwise would land in another partition than the user's other events.
    if key is not None and key != user_id.encode():
        raise _Reject(DlqReason.KEY_MISMATCH)
    return user_id, item_id, ts, v["event_type"], v["event_id"] or derive_event_id(user_id, item_id, ts)


def validate(
    raw: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    now_ms: int,
    settings: Settings,
    key: bytes | None = None,
    headers: Headers = (),
) -> ValidEvent | Invalid:
    """Check one message. `key` (the Kafka key), when given, must equal the user_id. `key` and
    `headers` travel with the result, so a DLQ record can keep them."""
    raw_b = raw if isinstance(raw, bytes) else (b"" if raw is None else bytes(raw))
    try:
        user_id, item_id, ts, event_type, event_id = _check(raw_b, key, now_ms, settings)
    except _Reject as r:
        return Invalid(r.reason, topic, partition, offset, raw_b, key, headers)
    except Exception:  # noqa: BLE001 - never crash on input (e.g. pathological nesting)
        return Invalid(DlqReason.UNPARSEABLE, topic, partition, offset, raw_b, key, headers)
    return ValidEvent(user_id, item_id, ts, event_type, event_id, partition, offset, topic, raw_b, key, headers)


def reject(event: ValidEvent, reason: DlqReason) -> Invalid:
    """DLQ record for a well-formed event refused later (too_late, state_unreadable, ...)."""
    return Invalid(reason, event.topic, event.partition, event.offset, event.raw, event.key, event.headers)


def too_late(event: ValidEvent) -> Invalid:
    """DLQ record for an event that the state guard found older than max_lateness."""
    return reject(event, DlqReason.TOO_LATE)
