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
    raw: bytes = field(default=b"", repr=False, compare=False)  # kept for a later DLQ record (too_late, ...)
    key: bytes | None = field(default=None, repr=False, compare=False)  # the Kafka key, for the DLQ record
    headers: tuple[tuple[str, bytes], ...] = field(default=(), repr=False, compare=False)  # the Kafka headers, idem
