"""state.record codec and state.guard (offset + dedupe) logic, without a broker."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from livemb.core.events import ValidEvent
from livemb.core.outcomes import Outcome
from livemb.state.guard import GuardState, keep_newer, plan_batch, position, unwrap, wrap
from livemb.state.record import MAGIC, StateRecordError, decode, encode, encode_rows, fingerprint
from livemb.stream.gap_repair import OffsetContinuity


def sample() -> tuple[dict[str, np.ndarray], dict[str, int]]:
    rng = np.random.default_rng(0)
    arrays = {
        "gru": rng.standard_normal(128).astype(np.float32),
        "window": rng.standard_normal((8, 64)).astype(np.float32),
        "items": rng.integers(0, 10**9, 16).astype(np.int64),
        "flags": np.array([1, 0, 1], np.uint8),
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((0, 64), np.float32),
    }
    return arrays, {"last_ts": 1_700_000_000_000, "session": 7, "neg": -5}


def test_round_trip_exact() -> None:
    arrays, meta = sample()
    out_a, out_m = decode(encode(arrays, meta))
    assert out_m == meta and set(out_a) == set(arrays)
    for k, a in arrays.items():
        assert out_a[k].dtype == a.dtype and out_a[k].shape == a.shape
        np.testing.assert_array_equal(out_a[k], a)
        assert out_a[k].flags.writeable


def test_deterministic_and_order_independent() -> None:
    arrays, meta = sample()
    rev = dict(reversed(list(arrays.items())))
    assert encode(arrays, meta) == encode(rev, dict(reversed(list(meta.items()))))


def test_size_budget_at_d64_h128() -> None:
    blob = encode({"h": np.zeros(128, np.float32), "win": np.zeros((8, 64), np.float32)}, {"t": 0})
    assert len(blob) < 4096


def test_big_endian_and_noncontiguous_inputs() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    out, _ = decode(encode({"a": a}, {}))
    np.testing.assert_array_equal(out["a"], a)


def test_rejects_object_dtype() -> None:
    with pytest.raises(StateRecordError, match="numeric"):
        encode({"o": np.array([object()])}, {})


def test_expected_fingerprint() -> None:
    arrays, meta = sample()
    blob = encode(arrays, meta)
    assert decode(blob, fingerprint(arrays, meta))
    other = dict(arrays, gru=np.zeros(64, np.float32))
    with pytest.raises(StateRecordError, match="schema"):
        decode(blob, fingerprint(other, meta))
    with pytest.raises(StateRecordError, match="schema"):
        decode(blob, fingerprint(arrays, {"x": 1}))


def test_foreign_magic_and_version() -> None:
    blob = encode(*sample())
    with pytest.raises(StateRecordError, match="not a livemb state record"):
        decode(b"JUNK" + blob[4:])
    with pytest.raises(StateRecordError, match="version 9"):
        decode(MAGIC + bytes([9]) + blob[5:])
    with pytest.raises(StateRecordError, match="not a livemb"):
        decode(b'{"json": "from an old build"}')


@pytest.mark.parametrize("cut", [0, 3, 10, 21, 22, 40, -1])
def test_truncated(cut: int) -> None:
    blob = encode(*sample())
    with pytest.raises(StateRecordError, match="truncated"):
        decode(blob[:cut])


def test_padded_and_bit_flips() -> None:
    blob = encode(*sample())
    with pytest.raises(StateRecordError):
        decode(blob + b"\x00")
    for i in range(22, len(blob), 97):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(StateRecordError, match="corrupt"):
            decode(bytes(bad))


def test_consistent_crc_but_lying_header_is_rejected() -> None:
    import zlib

    blob = encode({"a": np.zeros(4, np.float32)}, {})
    body = bytearray(blob[22:])
    body[-16] ^= 1  # changes data only: crc recomputed so only structure checks remain
    fp = struct.unpack_from("<Q", blob, 6)[0]
    forged = struct.pack("<4sBBQII", MAGIC, 1, 0, fp, zlib.crc32(bytes(body)), len(body)) + bytes(body)
    decode(forged)  # data flips are undetectable once the crc is forged, but still well-formed
    lying = bytearray(blob[22:])
    lying[0] = 5  # header claims 5 arrays; crc forged to match
    forged = struct.pack("<4sBBQII", MAGIC, 1, 0, fp, zlib.crc32(bytes(lying)), len(lying)) + bytes(lying)
    with pytest.raises(StateRecordError):
        decode(forged)


def test_not_bytes() -> None:
    with pytest.raises(StateRecordError):
        decode("text")  # type: ignore[arg-type]


# ---- guard ------------------------------------------------------------------------------------

def ev(user: str, ts: int, offset: int, eid: str | None = None, partition: int = 0) -> ValidEvent:
    return ValidEvent(user, "i", ts, "click", eid or f"{user}-{ts}", partition, offset)


DAY = 86_400_000


def test_guard_round_trip_via_envelope() -> None:
    g = GuardState(4)
    for i in range(6):
        g.decide(ev("u", 1000 + i, i), DAY)
    blob = wrap(g, b"\x01\x02inner")
    g2, inner = unwrap(blob, 4)
    assert inner == b"\x01\x02inner" and (g2.partition, g2.offset, g2.last_ts) == (0, 5, 1005)
    np.testing.assert_array_equal(g2.ring, g.ring)
    assert g2.pos == g.pos and position(blob) == (0, 5)
    assert unwrap(wrap(GuardState(4), None), 4)[1] is None


def test_guard_decisions() -> None:
    g = GuardState(3)
    assert g.decide(ev("u", 10_000, 5), DAY) is Outcome.OK
    assert g.decide(ev("u", 10_000, 5), DAY) is Outcome.REDELIVERED  # same offset
    assert g.decide(ev("u", 9_000, 4, "other"), DAY) is Outcome.REDELIVERED  # older offset
    assert g.decide(ev("u", 10_000, 6), DAY) is Outcome.DUPLICATE  # same event id, new offset
    assert g.decide(ev("u", 9_000, 7), DAY) is Outcome.LATE
    assert g.last_ts == 10_000
    assert g.decide(ev("u", 10_000 - DAY - 1, 8), DAY) is Outcome.TOO_LATE
    assert g.decide(ev("u", 10_000 - DAY, 9), DAY) is Outcome.LATE  # exactly at the bound
    assert g.offset == 9 and g.applied == 3


def test_guard_ring_forgets_after_size() -> None:
    g = GuardState(2)
    for i, e in enumerate(["a", "b", "c"]):
        g.decide(ev("u", 100 + i, i, e), DAY)
    assert g.decide(ev("u", 200, 10, "b"), DAY) is Outcome.DUPLICATE
    assert g.decide(ev("u", 201, 11, "a"), DAY) is Outcome.OK  # evicted


def test_guard_other_partition_is_not_compared() -> None:
    g = GuardState(2)
    g.decide(ev("u", 1, 50, partition=0), DAY)
    assert g.decide(ev("u", 2, 3, partition=1), DAY) is Outcome.OK
    assert (g.partition, g.offset) == (1, 3)


def test_guard_resizes_ring() -> None:
    g = GuardState(4)
    for i in range(4):
        g.decide(ev("u", i, i), DAY)
    g2, _ = unwrap(wrap(g, b""), 2)
    assert g2.ring.shape == (2,)


def test_plan_batch_replay_is_idempotent() -> None:
    batch = [ev(f"u{i % 3}", 1000 + i, i) for i in range(9)]
    plan = plan_batch(batch, {}, 8, DAY)
    assert len(plan.to_apply) == 9 and plan.counts() == {Outcome.OK: 9} and plan.dirty == {"u0", "u1", "u2"}
    rows = {u: wrap(g, b"s") for u, g in plan.guards.items()}
    again = plan_batch(batch, rows, 8, DAY)  # crash after the write: same offsets redelivered
    assert again.to_apply == [] and again.counts() == {Outcome.REDELIVERED: 9} and again.dirty == set()
    shifted = [ValidEvent(e.user_id, e.item_id, e.ts, e.event_type, e.event_id, 0, e.offset + 100) for e in batch]
    dup = plan_batch(shifted, rows, 8, DAY)  # upstream re-sent the same events at new offsets
    assert dup.to_apply == [] and dup.counts() == {Outcome.DUPLICATE: 9} and dup.dirty == {"u0", "u1", "u2"}


def test_plan_batch_duplicate_within_batch_and_too_late() -> None:
    batch = [ev("u", 5 * DAY, 0, "x"), ev("u", 5 * DAY, 1, "x"), ev("u", 3 * DAY, 2, "y")]
    plan = plan_batch(batch, {}, 4, DAY)
    assert plan.counts() == {Outcome.OK: 1, Outcome.DUPLICATE: 1, Outcome.TOO_LATE: 1}
    assert [e.offset for e in plan.too_late()] == [2] and plan.inner == {"u": None}


def test_keep_newer() -> None:
    old, new = GuardState(2), GuardState(2)
    old.decide(ev("u", 1, 3), DAY)
    new.decide(ev("u", 1, 3), DAY)
    new.decide(ev("u", 2, 9), DAY)
    a, b = wrap(old, b"old"), wrap(new, b"new")
    assert keep_newer(None, a) == a
    assert keep_newer(b, a) == b  # stale changelog copy does not win
    assert keep_newer(a, b) == b
    assert keep_newer(b"garbage", a) == a


def test_plan_batch_unreadable_row_is_isolated() -> None:
    batch = [ev("bad", 1, 0), ev("good", 1, 1), ev("bad", 2, 2)]
    plan = plan_batch(batch, {"bad": b"JUNKJUNKJUNKJUNKJUNKJUNKJUNK"}, 4, DAY)
    assert set(plan.unreadable) == {"bad"} and "not a livemb state record" in plan.unreadable["bad"]
    assert [e.offset for e in plan.rejected] == [0, 2]
    assert [e.user_id for e in plan.to_apply] == ["good"] and plan.dirty == {"good"}


def test_offset_continuity_reports_holes() -> None:
    c = OffsetContinuity()
    assert c.observe([("p0", 5), ("p0", 6), ("p1", 0)]) == []
    assert c.observe([("p0", 9), ("p1", 1), ("p0", 10)]) == [("p0", 7, 9, 0)]  # before item 0
    assert c.observe([("p0", 10), ("p0", 11)]) == []  # a re-delivery is not a hole
    c.forget(["p0"])
    assert c.observe([("p0", 0)]) == []


def test_cached_layout_decodes_like_a_full_parse_and_still_checks_each_record() -> None:
    """The worker's fast path: a layout's header is parsed once, later records of it are sliced.
    The cache must never accept what a full parse would refuse."""
    import zlib

    from livemb.state import record

    record._DECODE_LAYOUTS.clear()
    record._ENCODE_LAYOUTS.clear()
    arrays, meta = sample()
    first = encode(arrays, meta)
    assert decode(first)[1] == meta and len(record._DECODE_LAYOUTS) == 1  # parsed and remembered
    other = {k: (v + 1 if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    blob = encode(other, {**meta, "session": 8})  # same layout, other values and meta value
    got, got_meta = decode(blob)
    assert got_meta == {**meta, "session": 8}
    for k, v in other.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v)
        assert got[k].flags.writeable and got[k].flags.c_contiguous
    again, _ = decode(blob)
    again["gru"][0] = 123.0  # decoded arrays are copies, not views of the blob
    assert decode(blob)[0]["gru"][0] != 123.0
    # a header forged to claim another dtype, with a matching crc, misses the cache and is refused
    body = bytearray(blob[22:])
    i = body.index(b"<f4")
    body[i + 2] = ord("8")  # 'empty' <f4 -> <f8: the layout no longer matches its fingerprint
    fp = struct.unpack_from("<Q", blob, 6)[0]
    forged = struct.pack("<4sBBQII", MAGIC, 1, 0, fp, zlib.crc32(bytes(body)), len(body)) + bytes(body)
    with pytest.raises(StateRecordError):
        decode(forged)
    bad = bytearray(blob)
    bad[-3] ^= 0x10  # a data byte of a cached layout: the record's own crc still catches it
    with pytest.raises(StateRecordError, match="corrupt"):
        decode(bytes(bad))
    assert encode(other, {**meta, "session": 8}) == blob  # the cached header encodes byte for byte


def test_encode_rows_equals_one_encode_per_row() -> None:
    """The worker's batch writer: the same bytes as encoding each user's slice on its own, for a
    layout seen before and one that is new, with scalars, big-endian and non-contiguous fields."""
    from livemb.state.record import encode_rows

    rng = np.random.default_rng(5)
    B = 7
    rows = {
        "h": rng.normal(size=(B, 12)).astype(np.float32),
        "mem": rng.integers(0, 99, size=(B, 4, 3)).astype(">i8"),  # big-endian: stored little-endian
        "n": rng.integers(0, 9, size=B),  # a scalar per user
        "t": np.asfortranarray(rng.normal(size=(B, 5))),  # not C-contiguous
    }
    meta = {"items": 42, "a": -3}
    got = encode_rows(rows, meta)
    want = [encode({k: v[b] for k, v in rows.items()}, meta) for b in range(B)]
    assert got == want
    for b in (0, B - 1):
        arrays, m = decode(got[b])
        assert m == meta and all(np.array_equal(arrays[k], rows[k][b]) for k in rows)
    with pytest.raises(StateRecordError, match="leading batch axis"):
        encode_rows({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, meta)


def test_decode_rows_stacks_what_decode_reads_and_leaves_the_rest() -> None:
    """The worker's batch reader: records of the cached layout are decoded into stacked arrays equal
    to one decode each; a corrupt record, another layout and a non-record are left out (the
    caller decodes those one by one and gets the precise error)."""
    from livemb.state.record import decode_rows

    rng = np.random.default_rng(6)
    rows = {"h": rng.normal(size=(5, 6)).astype(np.float32), "n": np.arange(5)}
    blobs = encode_rows(rows, {"items": 9})
    decode(blobs[0])  # a full parse remembers the layout
    corrupt = bytearray(blobs[2])
    corrupt[-1] ^= 1
    other = encode({"h": np.zeros(3, np.float32)}, {"items": 9})
    mixed = [blobs[0], blobs[1], bytes(corrupt), other, b"junk", blobs[3], blobs[4]]
    pos, arrays, metas = decode_rows(mixed)
    assert pos == [0, 1, 5, 6]
    for j, b in enumerate([0, 1, 3, 4]):
        one, meta = decode(blobs[b])
        assert metas[j] == meta
        assert all(np.array_equal(arrays[k][j], one[k]) and arrays[k].dtype == one[k].dtype for k in one)
    assert arrays["h"].flags.c_contiguous and arrays["h"].flags.writeable
    assert decode_rows([other, b"junk"]) == ([], {}, [])  # no cached layout among them
