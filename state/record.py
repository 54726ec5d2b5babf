"""Versioned binary codec for one user's state: named numpy arrays + named int64 counters.

Layout (little-endian):
    magic  b"LMBS" | version u8 | flags u8 | schema fingerprint u64 | crc32 u32 | body_len u32
    body:  n_arrays u8 | n_meta u8
           per array: name_len u8, name, dtype_len u8, dtype.str, ndim u8, dims u32 * ndim
           per meta:  name_len u8, name, value i64
           array buffers, in header order (raw, C order)
No pickle: only numeric dtypes are accepted. The fingerprint hashes (array names, dtypes, shapes,
meta names), so a record written under another schema is rejected with a clear message instead of
being misread; the crc catches corrupt or truncated records.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np

MAGIC = b"LMBS"
VERSION = 1
_PREFIX = struct.Struct("<4sBBQII")  # magic, version, flags, fingerprint, crc32, body_len
_ALLOWED_KINDS = set("biufc")

Arrays = dict[str, np.ndarray]
Meta = dict[str, int]


class StateRecordError(ValueError):
    """A stored state record that this build cannot read (foreign, corrupt or other schema)."""


def _norm_dtype(dt: np.dtype) -> np.dtype:
    if dt.kind not in _ALLOWED_KINDS:
        raise StateRecordError(f"dtype {dt} not storable (numeric dtypes only, no pickle)")
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


def schema_of(arrays: Arrays, meta: Meta) -> str:
    """Canonical schema text: the thing the fingerprint hashes (sorted, so dict order is irrelevant)."""
    parts = [f"{n}:{_norm_dtype(np.asarray(a).dtype).str}:{tuple(np.shape(a))}" for n, a in sorted(arrays.items())]
    return ";".join(parts) + "|" + ",".join(sorted(meta))


def fingerprint(arrays: Arrays, meta: Meta) -> int:
    h = hashlib.blake2b(schema_of(arrays, meta).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def _name(n: str) -> bytes:
    b = n.encode()
    if not 0 < len(b) < 256:
        raise StateRecordError(f"bad field name {n!r}")
    return bytes([len(b)]) + b


# The live worker writes and reads thousands of records of ONE layout per second, so the parsed
# header of a layout is kept (a few layouts at most: one per served model and item table). A
# cached header is only ever one that a full parse validated; every record still has its own
# magic, version, flags, length and crc checked.
_ENCODE_HEADS: dict[tuple, tuple[bytes, int]] = {}
_DECODE_HEADS: dict[tuple[int, int], tuple[bytes, list[tuple[str, np.dtype, tuple[int, ...], int, int]], Meta]] = {}
_CACHE_MAX = 64


def _head(arrays: Arrays, meta: Meta) -> tuple[bytes, int]:
    """(header bytes, fingerprint) of a layout, from the cache when this layout was seen."""
    key = (tuple((n, np.asarray(a).dtype.str, np.shape(a)) for n, a in sorted(arrays.items())),
           tuple(sorted(meta.items())))
    hit = _ENCODE_HEADS.get(key)
    if hit is not None:
        return hit
    if len(arrays) > 255 or len(meta) > 255:
        raise StateRecordError("too many fields")
    head = [bytes([len(arrays), len(meta)])]
    for n in sorted(arrays):
        a = np.asarray(arrays[n])
        ds = _norm_dtype(a.dtype).str.encode()
        head.append(_name(n) + bytes([len(ds)]) + ds + bytes([a.ndim]) + struct.pack(f"<{a.ndim}I", *a.shape))
    for n in sorted(meta):
        head.append(_name(n) + struct.pack("<q", int(meta[n])))
    out = (b"".join(head), fingerprint(arrays, meta))
    if len(_ENCODE_HEADS) >= _CACHE_MAX:
        _ENCODE_HEADS.clear()
    _ENCODE_HEADS[key] = out
    return out


def encode(arrays: Arrays, meta: Meta) -> bytes:
    head, fp = _head(arrays, meta)
    body = head + b"".join(
        np.ascontiguousarray(a, dtype=_norm_dtype(np.asarray(a).dtype)).tobytes() for _, a in sorted(arrays.items()))
    return _PREFIX.pack(MAGIC, VERSION, 0, fp, zlib.crc32(body), len(body)) + body


class _Reader:
    def __init__(self, body: bytes) -> None:
        self.b = memoryview(body)
        self.i = 0

    def take(self, n: int) -> memoryview:
        if self.i + n > len(self.b):
            raise StateRecordError("state record truncated")
        out = self.b[self.i : self.i + n]
        self.i += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def name(self) -> str:
        return bytes(self.take(self.u8())).decode()


def decode(blob: bytes, expect_fingerprint: int | None = None) -> tuple[Arrays, Meta]:
    """Inverse of `encode`. `expect_fingerprint` (see `fingerprint`) rejects records of another schema."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise StateRecordError(f"state record must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _PREFIX.size:
        raise StateRecordError(f"state record truncated ({len(blob)} bytes, header needs {_PREFIX.size})")
    magic, version, _flags, fp, crc, body_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise StateRecordError(f"not a livemb state record (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise StateRecordError(f"state record format version {version}; this build reads version {VERSION}")
    if _flags != 0:  # none defined yet: a set bit is corruption or a newer writer
        raise StateRecordError(f"state record has unknown flags {_flags:#04x}")
    body = blob[_PREFIX.size :]
    if len(body) != body_len:
        raise StateRecordError(f"state record truncated or padded: body {len(body)} bytes, header says {body_len}")
    if zlib.crc32(body) != crc:
        raise StateRecordError("state record corrupt (crc32 mismatch)")
    if expect_fingerprint is not None and fp != expect_fingerprint:
        raise StateRecordError(
            f"state record schema {fp:016x} differs from the expected schema {expect_fingerprint:016x}; "
            "it was written by another model/state layout (drop the data dir or migrate)"
        )
    cached = _DECODE_HEADS.get((fp, body_len))
    if cached is not None and body.startswith(cached[0]):
        arrays = {name: np.frombuffer(body, dtype=dt, count=count, offset=off).reshape(shape).copy()
                  for name, dt, shape, off, count in cached[1]}
        return arrays, dict(cached[2])
    try:
        r = _Reader(body)
        n_arr, n_meta = r.u8(), r.u8()
        specs = []
        for _ in range(n_arr):
            name = r.name()
            dt = np.dtype(bytes(r.take(r.u8())).decode())
            _norm_dtype(dt)
            ndim = r.u8()
            shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim))
            specs.append((name, dt, shape))
        meta: Meta = {}
        for _ in range(n_meta):
            name = r.name()
            meta[name] = struct.unpack("<q", r.take(8))[0]
        arrays: Arrays = {}
        for name, dt, shape in specs:
            nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(r.take(nbytes), dtype=dt).reshape(shape).copy()
    except (UnicodeDecodeError, TypeError, ValueError) as exc:
        if isinstance(exc, StateRecordError):
            raise
        raise StateRecordError(f"state record unreadable: {exc}") from None
    if r.i != len(body):
        raise StateRecordError(f"state record has {len(body) - r.i} trailing bytes")
    if fingerprint(arrays, meta) != fp:
        raise StateRecordError("state record fingerprint does not match its own layout (corrupt)")
    _remember_layout(fp, body, specs, meta)
    return arrays, meta


def _remember_layout(fp: int, body: bytes, specs: list[tuple[str, np.dtype, tuple[int, ...]]], meta: Meta) -> None:
    """Cache a fully validated record's header: the same header bytes mean the same buffers."""
    data = sum(dt.itemsize * int(np.prod(shape, dtype=np.int64)) for _, dt, shape in specs)
    head_len = len(body) - data
    fields, off = [], head_len
    for name, dt, shape in specs:
        count = int(np.prod(shape, dtype=np.int64))
        fields.append((name, dt, shape, off, count))
        off += dt.itemsize * count
    if len(_DECODE_HEADS) >= _CACHE_MAX:
        _DECODE_HEADS.clear()
    _DECODE_HEADS[(fp, len(body))] = (body[:head_len], fields, dict(meta))
