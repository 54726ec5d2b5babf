"""Property tests (hypothesis, derandomized so CI is reproducible): hostile input never raises and
always gets a reason (10,000 generated payloads across the three validator tests); state records round-trip, and every truncation and bit flip is rejected."""

from __future__ import annotations

import math

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemb.core.events import ValidEvent
from livemb.core.settings import Settings
from livemb.state.record import StateRecordError, decode, encode
from livemb.stream.dlq import MAX_DLQ_VALUE_BYTES, REASON_HEADER, dead_letter, header
from livemb.stream.validate import MAX_USER_ID_CHARS, Invalid, validate

SETTINGS = Settings()
NOW = 1_764_000_000_000
# 1,000 documents a property (~10 s each on 2 cores); the raw-bytes property below takes 5,000
PROPS = settings(max_examples=1_000, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON-ish values, hostile on purpose: huge and negative ints, NaN/inf, control characters, nesting.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=8),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)
field_values = {
    "user_id": st.one_of(values, st.text(min_size=1, max_size=200), st.integers()),
    "item_id": st.one_of(values, st.text(min_size=1, max_size=20), st.integers()),
    "ts": st.one_of(values, st.integers(min_value=-(2**66), max_value=2**66),
                    st.integers(min_value=NOW - 10**10, max_value=NOW + 10**9), st.sampled_from(
                        ["2025-11-24T12:00:00Z", "2025-11-24", "not a date", "", "2025-13-45T99:99"])),
    "event_type": st.one_of(values, st.sampled_from(["click", "view", "cart", "purchase", ""])),
    "event_id": st.one_of(values, st.text(max_size=30)),
}
documents = st.fixed_dictionaries({}, optional=field_values).flatmap(
    lambda d: st.dictionaries(st.text(max_size=6), values, max_size=3).map(lambda extra: {**extra, **d}))


def dumps(doc: object) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY, default=str)


def encoded(doc: object) -> bytes:
    try:
        return dumps(doc)
    except (TypeError, orjson.JSONEncodeError):  # e.g. ints beyond 64 bits: write them by hand
        return repr(doc).replace("'", '"').replace("None", "null").encode()


def payloads():
    raw_bytes = st.binary(max_size=300)
    docs = documents.map(encoded)
    duplicate_keys = st.tuples(st.text(max_size=10), st.text(max_size=10)).map(
        lambda ab: b'{"user_id": %s, "user_id": %s, "item_id": 1, "ts": %d}'
        % (orjson.dumps(ab[0]), orjson.dumps(ab[1]), NOW))
    deep = st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n)
    nan_inf = st.sampled_from([b'{"user_id": "u", "item_id": 1, "ts": NaN}', b'{"user_id": "u", "item_id": 1, "ts": Infinity}',
                               b'{"user_id": "u", "item_id": 1, "ts": 1e400}', b'{"user_id": "u", "item_id": 1, "ts": -0.0}'])
    return st.one_of(raw_bytes, docs, docs, duplicate_keys, deep, nan_inf)


keys = st.one_of(st.none(), st.binary(max_size=20), st.text(max_size=10).map(str.encode))


def check_outcome(raw: bytes, key: bytes | None) -> None:
    out = validate(raw, "interactions", 3, 42, NOW, SETTINGS, key=key)
    if isinstance(out, Invalid):
        assert isinstance(out.reason, str) and out.reason
        rec = dead_letter(out, "interactions.dlq", NOW)  # the original record + the error headers
        assert rec.key == key and rec.value == raw[:MAX_DLQ_VALUE_BYTES]
        assert header(rec.headers, REASON_HEADER) == out.reason and header(rec.headers, "__connect.errors.offset") == "42"
        return
    assert isinstance(out, ValidEvent)
    assert 0 < len(out.user_id) <= MAX_USER_ID_CHARS and out.item_id != ""
    assert isinstance(out.ts, int) and 0 <= out.ts <= NOW + SETTINGS.max_future_s * 1000
    assert out.event_type and out.event_id
    assert key is None or key == out.user_id.encode()


@settings(PROPS, max_examples=5_000)
@given(raw=payloads(), key=keys)
def test_validator_never_raises_and_always_gives_a_reason(raw: bytes, key: bytes | None) -> None:
    check_outcome(raw, key)


@PROPS
@given(doc=documents)
def test_validator_on_documents_keyed_by_their_user(doc: dict) -> None:
    raw = encoded(doc)
    uid = doc.get("user_id")
    key = str(uid).encode() if isinstance(uid, str | int) and not isinstance(uid, bool) else None
    check_outcome(raw, key)


@PROPS
@given(doc=documents, key=st.binary(min_size=1, max_size=12))
def test_wrong_key_is_never_accepted(doc: dict, key: bytes) -> None:
    out = validate(encoded(doc), "interactions", 0, 0, NOW, SETTINGS, key=key)
    assert isinstance(out, Invalid) or key == out.user_id.encode()


# ---------------------------------------------------------------------------- state records
dtypes = st.sampled_from([np.int8, np.uint8, np.int32, np.int64, np.float16, np.float32, np.float64])
arrays = st.dictionaries(
    st.text(alphabet="abcdefghij_", min_size=1, max_size=8),
    st.tuples(dtypes, st.lists(st.integers(0, 5), max_size=2)).map(
        lambda d: (np.arange(math.prod(d[1]) if d[1] else 1, dtype=np.float64).reshape(d[1]) * 1.5).astype(d[0])),
    max_size=4)
metas = st.dictionaries(st.text(alphabet="klmnop", min_size=1, max_size=6),
                        st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(a=arrays, m=metas)
def test_state_record_round_trip_and_every_corruption_is_rejected(a: dict, m: dict) -> None:
    blob = encode(a, m)
    got_a, got_m = decode(blob)
    assert got_m == m and set(got_a) == set(a)
    for k, v in a.items():
        assert got_a[k].dtype == v.dtype and got_a[k].shape == v.shape
        np.testing.assert_array_equal(got_a[k], v)
    for cut in range(len(blob)):
        try:
            decode(blob[:cut])
        except StateRecordError:
            continue
        raise AssertionError(f"truncation to {cut} of {len(blob)} bytes was accepted")
    buf = bytearray(blob)
    for bit in range(len(blob) * 8):
        buf[bit // 8] ^= 1 << (bit % 8)
        try:
            decode(bytes(buf))
        except StateRecordError:
            pass
        else:
            raise AssertionError(f"bit flip {bit} of {len(blob) * 8} was accepted")
        finally:
            buf[bit // 8] ^= 1 << (bit % 8)
