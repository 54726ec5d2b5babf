"""Input validation (SPEC section 2): one raw Kafka message -> `ValidEvent` or `Invalid`.

Pure functions, no broker. The worker never raises on input: everything unexpected becomes an
`Invalid` with its `DlqReason` (core/outcomes.py), and `Invalid.dlq_payload()` is what goes to `interactions.dlq`.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from core.events import ValidEvent
from core.outcomes import DlqReason

if TYPE_CHECKING:
    from core.settings import Settings

MAX_USER_ID_CHARS = 128
# A DLQ record carries the raw input; cap it so a huge bad message cannot exceed the broker's
# message size limit when re-produced (base64 grows it by 4/3).
MAX_DLQ_RAW_BYTES = 256 * 1024
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: DlqReason
    topic: str
    partition: int
    offset: int
    raw: bytes = field(repr=False)

    def dlq_payload(self) -> bytes:
        raw = self.raw[:MAX_DLQ_RAW_BYTES]
        doc: dict[str, object] = {
            "reason": self.reason,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }
        try:
            doc["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            doc["raw"] = base64.b64encode(raw).decode("ascii")
            doc["raw_encoding"] = "base64"
        if len(self.raw) > MAX_DLQ_RAW_BYTES:
            doc["raw_truncated"] = True
            doc["raw_size"] = len(self.raw)
        return orjson.dumps(doc)


def derive_event_id(user_id: str, item_id: str, ts: int) -> str:
    """Deterministic id for events without one, so a replayed copy is recognised as a duplicate."""
    h = hashlib.blake2b(f"{user_id}\x1f{item_id}\x1f{ts}".encode(), digest_size=12)
    return "d-" + h.hexdigest()


class _Reject(Exception):
    def __init__(self, reason: DlqReason) -> None:
        self.reason = reason


def _ident(doc: dict[str, object], name: str) -> str:
    """user_id / item_id: string or integer (not bool), normalised to str."""
    if name not in doc or doc[name] is None:
        raise _Reject(DlqReason.of_field("missing_field", name))
    v = doc[name]
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise _Reject(DlqReason.of_field("bad_type", name))
    s = str(v)
    if not s.strip():
        raise _Reject(DlqReason.of_field("empty_field", name))
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
    if ms < 0 or ms > _INT64_MAX:
        raise _Reject(DlqReason.BAD_VALUE_TS)
    return ms


def _optional_str(doc: dict[str, object], name: str, default: str | None) -> str | None:
    v = doc.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _Reject(DlqReason.of_field("bad_type", name))
    if not v:
        raise _Reject(DlqReason.of_field("empty_field", name))
    return v


def _check(raw: bytes, key: bytes | None, now_ms: int, settings: Settings) -> tuple[str, str, int, str, str]:
    if len(raw) > settings.max_payload_bytes:
        raise _Reject(DlqReason.OVERSIZED)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Reject(DlqReason.NOT_JSON) from None
    if not isinstance(doc, dict):
        raise _Reject(DlqReason.NOT_OBJECT)
    user_id = _ident(doc, "user_id")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise _Reject(DlqReason.USER_ID_TOO_LONG)
    item_id = _ident(doc, "item_id")
    if "ts" not in doc or doc["ts"] is None:
        raise _Reject(DlqReason.MISSING_TS)
    ts = parse_ts(doc["ts"])
    if ts > now_ms + int(settings.max_future_s * 1000):
        raise _Reject(DlqReason.FUTURE_TS)
    event_type = _optional_str(doc, "event_type", "click")
    event_id = _optional_str(doc, "event_id", None)
    # Per-user offsets and changelog partitions assume key = user_id (SPEC 1); a message keyed
    # otherwise would land in another partition than the user's other events.
    if key is not None and key != user_id.encode():
        raise _Reject(DlqReason.KEY_MISMATCH)
    assert event_type is not None
    return user_id, item_id, ts, event_type, event_id or derive_event_id(user_id, item_id, ts)


def validate(
    raw: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    now_ms: int,
    settings: Settings,
    key: bytes | None = None,
) -> ValidEvent | Invalid:
    """Check one message. `key` (the Kafka key), when given, must equal the user_id."""
    raw_b = raw if isinstance(raw, bytes) else (b"" if raw is None else bytes(raw))
    try:
        user_id, item_id, ts, event_type, event_id = _check(raw_b, key, now_ms, settings)
    except _Reject as r:
        return Invalid(r.reason, topic, partition, offset, raw_b)
    except Exception:  # noqa: BLE001 - never crash on input (e.g. pathological nesting)
        return Invalid(DlqReason.UNPARSEABLE, topic, partition, offset, raw_b)
    return ValidEvent(user_id, item_id, ts, event_type, event_id, partition, offset, topic, raw_b)


def reject(event: ValidEvent, reason: DlqReason) -> Invalid:
    """DLQ record for a well-formed event refused later (too_late, state_unreadable, ...)."""
    return Invalid(reason, event.topic, event.partition, event.offset, event.raw)


def too_late(event: ValidEvent) -> Invalid:
    """DLQ record for an event that the state guard found older than max_lateness."""
    return reject(event, DlqReason.TOO_LATE)
