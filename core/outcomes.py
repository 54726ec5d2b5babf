"""What happened to each input event: its `Outcome` (the `outcome` label of `livemb_events_total`)
and, for an event sent to the dead-letter topic, its `DlqReason` (the DLQ record's `reason` field
and the `reason` label of `livemb_dlq_total`).

The string values are a wire contract (DLQ consumers, alert rules, dashboards read them): never
rename a value; add a member instead.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    # in the order /metrics has always listed them (stream/metrics.py exports every one from 0)
    OK = "ok"  # applied
    INVALID = "invalid"  # failed validation (SPEC section 2): DLQ
    DUPLICATE = "duplicate"  # event_id seen recently: skipped
    LATE = "late"  # applied, but older than the user's last_ts
    TOO_LATE = "too_late"  # older than last_ts - max_lateness: DLQ
    # Not a decision but a tag: an applied event whose item is not in the item table is counted
    # here *and* as ok / late (SPEC section 2, docs/STREAMING.md).
    UNKNOWN_ITEM = "unknown_item"
    REDELIVERED = "redelivered"  # offset already applied (at-least-once redelivery): skipped
    ERROR = "error"  # unreadable state or a processing failure: DLQ (instead of ok / late)


class DlqReason(enum.StrEnum):
    # validation (stream/validate.py): outcome invalid
    OVERSIZED = "oversized"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    UNPARSEABLE = "unparseable"  # the validator itself failed (e.g. pathological nesting)
    MISSING_USER_ID = "missing_field:user_id"
    MISSING_ITEM_ID = "missing_field:item_id"
    MISSING_TS = "missing_field:ts"
    BAD_TYPE_USER_ID = "bad_type:user_id"
    BAD_TYPE_ITEM_ID = "bad_type:item_id"
    BAD_TYPE_TS = "bad_type:ts"
    BAD_TYPE_EVENT_TYPE = "bad_type:event_type"
    BAD_TYPE_EVENT_ID = "bad_type:event_id"
    EMPTY_USER_ID = "empty_field:user_id"
    EMPTY_ITEM_ID = "empty_field:item_id"
    EMPTY_EVENT_TYPE = "empty_field:event_type"
    EMPTY_EVENT_ID = "empty_field:event_id"
    BAD_VALUE_TS = "bad_value:ts"
    USER_ID_TOO_LONG = "user_id_too_long"
    FUTURE_TS = "future_ts"
    KEY_MISMATCH = "key_mismatch"
    # later steps of the batch (stream/batch.py)
    TOO_LATE = "too_late"  # outcome too_late
    STATE_UNREADABLE = "state_unreadable"  # outcome error
    PROCESSING_ERROR = "processing_error"  # outcome error

    @classmethod
    def of_field(cls, problem: str, name: str) -> DlqReason:
        """The reason for `problem` (missing_field / bad_type / empty_field / bad_value) of field `name`."""
        return cls(f"{problem}:{name}")
