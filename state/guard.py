"""Exactly-once-for-state on an at-least-once broker: per-user input offset + event-id memory.

Every table row is an *envelope* (a `state.record`) holding
  - the processor's own state blob (opaque bytes, array `inner`),
  - the (partition, offset) of the last input event decided for this user,
  - last_ts (max event time applied) and a ring of recent event-id hashes (int64),
  - with a shadow model (stream/shadow.py), the shadow's own state blob (array `shadow`, absent
    otherwise: a row without a shadow is byte for byte what it was before shadows existed).
Offset and states are one value, written in one RocksDB put, so they cannot disagree. Per-user
offsets equal a per-partition offset: the input is keyed by user_id, so all of a user's events
live in one partition, in offset order; "offset <= stored" means "this user already saw it".
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from livemb.core.events import ValidEvent
from livemb.core.outcomes import Outcome
from livemb.state.record import StateRecordError, decode, encode

_NO_TS = -(2**63)


# The guard's decisions are outcomes: ok / late (applied), redelivered / duplicate (skipped),
# too_late (DLQ). A later step may still turn an applied event into `error` (stream/batch.py).
APPLIED = (Outcome.OK, Outcome.LATE)


def event_hash(event_id: str) -> int:
    """Stable signed int64 of an event id (never 0, which marks an empty ring slot)."""
    h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little", signed=True)
    return h or 1


@dataclass
class GuardState:
    size: int
    partition: int = -1
    offset: int = -1
    last_ts: int = _NO_TS
    applied: int = 0
    pos: int = 0
    ring: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if self.ring.shape != (self.size,):
            old = self.ring[self.ring != 0][-self.size :] if self.ring.size else self.ring
            ring = np.zeros(self.size, np.int64)
            ring[: old.size] = old
            self.ring, self.pos = ring, old.size % self.size

    def seen(self, h: int) -> bool:
        return bool((self.ring == h).any())

    def remember(self, h: int) -> None:
        self.ring[self.pos] = h
        self.pos = (self.pos + 1) % self.size

    def decide(self, ev: ValidEvent, max_lateness_ms: int, log_id: int = 0) -> Outcome:
        """Classify one event and update the guard (not the model state) accordingly. `log_id`
        names the incarnation of the input topic (see `source_key`)."""
        source = source_key(ev.partition, log_id)
        if source == self.partition and ev.offset <= self.offset:
            return Outcome.REDELIVERED
        # Another partition (topic re-partitioned) or another log (topic re-created, a broker
        # that lost its data) cannot be compared by offset: start over from this event.
        self.partition, self.offset = source, ev.offset
        h = event_hash(ev.event_id)
        if self.seen(h):
            return Outcome.DUPLICATE
        if self.last_ts != _NO_TS and ev.ts < self.last_ts - max_lateness_ms:
            return Outcome.TOO_LATE
        late = self.last_ts != _NO_TS and ev.ts < self.last_ts
        self.remember(h)
        self.last_ts = max(self.last_ts, ev.ts)
        self.applied += 1
        return Outcome.LATE if late else Outcome.OK


def source_key(partition: int, log_id: int) -> int:
    """The stored "partition" of a guard: the input partition, tagged with a 30-bit id of the topic's
    incarnation (0 when the broker has no topic ids: then it is the plain partition number)."""
    return ((log_id & 0x3FFF_FFFF) << 32) | partition


def wrap(g: GuardState, inner: bytes | None, shadow: bytes | None = None) -> bytes:
    """Envelope = guard fields + the processor's blob (+ the shadow's), in one record (one RocksDB value)."""
    arrays = {"dedupe": g.ring, "inner": np.frombuffer(inner or b"", np.uint8)}
    if shadow is not None:
        arrays["shadow"] = np.frombuffer(shadow, np.uint8)
    meta = {
        "partition": g.partition,
        "offset": g.offset,
        "last_ts": g.last_ts,
        "applied": g.applied,
        "pos": g.pos,
        "has_inner": int(inner is not None),
    }
    return encode(arrays, meta)


def unwrap(blob: bytes | None, size: int) -> tuple[GuardState, bytes | None]:
    g, inner, _ = unwrap_all(blob, size)
    return g, inner


def unwrap_all(blob: bytes | None, size: int) -> tuple[GuardState, bytes | None, bytes | None]:
    """(guard, processor blob, shadow blob); None for a blob the row does not hold."""
    if blob is None:
        return GuardState(size), None, None
    arrays, meta = decode(blob)
    try:
        g = GuardState(
            size,
            partition=meta["partition"],
            offset=meta["offset"],
            last_ts=meta["last_ts"],
            applied=meta["applied"],
            pos=meta["pos"] % max(1, arrays["dedupe"].size),
            ring=arrays["dedupe"].astype(np.int64),
        )
        inner = arrays["inner"].tobytes() if meta["has_inner"] else None
    except KeyError as exc:
        raise StateRecordError(f"table row is not a livemb guard envelope (missing {exc})") from None
    shadow = arrays["shadow"].tobytes() if "shadow" in arrays else None
    return g, inner, shadow


def position(blob: bytes) -> tuple[int, int]:
    """(partition, offset) stored in an envelope."""
    _, meta = decode(blob)
    return meta["partition"], meta["offset"]


def keep_newer(current: bytes | None, incoming: bytes) -> bytes:
    """Changelog recovery merge: never let an older changelog copy overwrite a newer local row.

    Tansu's wrong end offsets can make recovery replay a stale slice of the changelog onto an intact
    local store; the row with the higher input offset of the same partition is the newer one.
    """
    if current is None:
        return incoming
    try:
        cp, co = position(current)
        ip, io = position(incoming)
    except (StateRecordError, KeyError):
        return incoming
    return current if cp == ip and co > io else incoming


@dataclass
class BatchPlan:
    """Guard's view of one micro-batch: what to apply, what to count, what to write back."""

    guards: dict[str, GuardState]
    inner: dict[str, bytes | None]
    to_apply: list[ValidEvent]
    decisions: list[tuple[ValidEvent, Outcome]]
    dirty: set[str]  # users whose guard changed (must be written even if nothing applied)
    unreadable: dict[str, str] = field(default_factory=dict)  # user -> StateRecordError text
    rejected: list[ValidEvent] = field(default_factory=list)  # events of unreadable users
    shadow: dict[str, bytes | None] = field(default_factory=dict)  # user -> the shadow's stored blob

    def counts(self) -> Counter[Outcome]:
        """The guard's decisions (the batch step's own count also knows which applied events failed)."""
        return Counter(d for _, d in self.decisions)

    def too_late(self) -> list[ValidEvent]:
        return [e for e, d in self.decisions if d is Outcome.TOO_LATE]


def plan_batch(
    events: Sequence[ValidEvent], rows: dict[str, bytes | None], dedupe_memory: int, max_lateness_ms: int,
    log_ids: dict[str, int] | None = None,
) -> BatchPlan:
    """Decide every event of a batch (arrival order) against the users' stored envelopes.
    `log_ids`: topic -> id of its current incarnation (absent topics: 0)."""
    log_ids = log_ids or {}
    guards: dict[str, GuardState] = {}
    inner: dict[str, bytes | None] = {}
    shadow: dict[str, bytes | None] = {}
    unreadable: dict[str, str] = {}
    for uid in _unique(e.user_id for e in events):
        try:
            guards[uid], inner[uid], shadow[uid] = unwrap_all(rows.get(uid), dedupe_memory)
        except StateRecordError as exc:  # keep the row for inspection, refuse its events
            unreadable[uid] = str(exc)
    decisions: list[tuple[ValidEvent, Outcome]] = []
    to_apply: list[ValidEvent] = []
    dirty: set[str] = set()
    rejected = [e for e in events if e.user_id in unreadable]
    for ev in events:
        if ev.user_id in unreadable:
            continue
        d = guards[ev.user_id].decide(ev, max_lateness_ms, log_ids.get(ev.topic, 0))
        decisions.append((ev, d))
        if d is not Outcome.REDELIVERED:
            dirty.add(ev.user_id)
        if d in APPLIED:
            to_apply.append(ev)
    return BatchPlan(guards, inner, to_apply, decisions, dirty, unreadable, rejected, shadow)


def _unique(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))
