"""The validated input event (SPEC section 2): what every layer above the validator works with."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ValidEvent:
    user_id: str
    item_id: str
    ts: int  # event time, epoch ms
    event_type: str
    event_id: str
    partition: int
    offset: int
    topic: str = ""
    raw: bytes = field(default=b"", repr=False, compare=False)  # kept for a too_late DLQ record
