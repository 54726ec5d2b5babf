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
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from livemb.core.errors import DataError

MAGIC = b"LMBS"
VERSION = 1
_PREFIX = struct.Struct("<4sBBQII")  # magic, version, flags, fingerprint, crc32, body_len
_ALLOWED_KINDS = set("biufc")

Arrays = dict[str, np.ndarray]
Meta = dict[str, int]


class StateRecordError(DataError):
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


# The live worker writes and reads thousands of records of ONE layout per second, so a parsed
# layout (array specs + meta names; meta VALUES vary per record and are packed with a cached
# struct) is kept: a few layouts at most, one per served model and item table, plus the guard
# envelope. A cached layout is only ever one that a full parse (or `_layout`) validated; every
# record still has its own magic, version, flags, length and crc checked.
@dataclass(frozen=True)
class _Layout:
    head: bytes  # n_arrays, n_meta and the array specs: the body up to the meta entries
    meta_names: tuple[str, ...]  # sorted
    meta_tags: tuple[bytes, ...]  # each meta name as stored (length-prefixed)
    meta_struct: struct.Struct  # the meta entries: (tag, int64 value) per name
    fields: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]  # name, dtype, shape, body offset, count
    fp: int
    body_len: int

    def pack_meta(self, meta: Meta) -> bytes:
        return self.meta_struct.pack(*chain.from_iterable(zip(self.meta_tags, (int(meta[n]) for n in self.meta_names),
                                                                strict=True)))

    def read(self, body: bytes) -> tuple[Arrays, Meta] | None:
        """The record's arrays and meta if `body` is of this layout, else None (full parse)."""
        if not body.startswith(self.head):
            return None
        vals = self.meta_struct.unpack_from(body, len(self.head))
        if vals[0::2] != self.meta_tags:
            return None
        arrays = {name: np.frombuffer(body, dtype=dt, count=count, offset=off).reshape(shape).copy()
                  for name, dt, shape, off, count in self.fields}
        return arrays, dict(zip(self.meta_names, vals[1::2], strict=True))


_ENCODE_LAYOUTS: dict[tuple, _Layout] = {}
_DECODE_LAYOUTS: dict[tuple[int, int], _Layout] = {}
_CACHE_MAX = 64


def _layout(specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]], meta_names: Sequence[str]) -> _Layout:
    """specs: (name, normalized dtype, shape) sorted by name; meta_names sorted."""
    if len(specs) > 255 or len(meta_names) > 255:
        raise StateRecordError("too many fields")
    head = [bytes([len(specs), len(meta_names)])]
    for n, dt, shape in specs:
        ds = dt.str.encode()
        head.append(_name(n) + bytes([len(ds)]) + ds + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape))
    tags = tuple(_name(n) for n in meta_names)
    meta_struct = struct.Struct("<" + "".join(f"{len(t)}sq" for t in tags))
    head_b = b"".join(head)
    fields, off = [], len(head_b) + meta_struct.size
    for n, dt, shape in specs:
        count = int(np.prod(shape, dtype=np.int64))
        fields.append((n, dt, tuple(shape), off, count))
        off += dt.itemsize * count
    fp = int.from_bytes(hashlib.blake2b(
        (";".join(f"{n}:{dt.str}:{tuple(shape)}" for n, dt, shape in specs) + "|" + ",".join(meta_names)).encode(),
        digest_size=8).digest(), "little")
    return _Layout(head_b, tuple(meta_names), tags, meta_struct, tuple(fields), fp, off)


def _encode_layout(arrays: dict[str, np.ndarray], meta: Meta, batched: bool = False) -> _Layout:
    """The layout of a record of these arrays (row shapes: a leading batch axis is dropped)."""
    key = (tuple((n, a.dtype.str, a.shape[1:] if batched else a.shape) for n, a in sorted(arrays.items())),
           tuple(sorted(meta)))
    lay = _ENCODE_LAYOUTS.get(key)
    if lay is None:
        lay = _layout([(n, _norm_dtype(arrays[n].dtype), shape) for n, _, shape in key[0]], key[1])
        if len(_ENCODE_LAYOUTS) >= _CACHE_MAX:
            _ENCODE_LAYOUTS.clear()
        _ENCODE_LAYOUTS[key] = lay
    return lay


def encode(arrays: Arrays, meta: Meta) -> bytes:
    arrs = {n: np.asarray(a) for n, a in arrays.items()}
    lay = _encode_layout(arrs, meta)
    body = b"".join([lay.head, lay.pack_meta(meta),
                     *(np.ascontiguousarray(arrs[n], dtype=dt).tobytes() for n, dt, _, _, _ in lay.fields)])
    return _PREFIX.pack(MAGIC, VERSION, 0, lay.fp, zlib.crc32(body), len(body)) + body


def encode_rows(arrays: Arrays, meta: Meta) -> list[bytes]:
    """[encode({k: v[b] for k, v in arrays.items()}, meta) for b in range(B)], byte for byte, for
    arrays with a leading batch axis B: one byte matrix for the batch instead of one tobytes()
    per field and user (the worker writes one record per user of every batch)."""
    arrs = {n: np.asarray(a) for n, a in arrays.items()}
    sizes = {a.shape[0] for a in arrs.values() if a.ndim}
    if len(sizes) != 1 or any(a.ndim == 0 for a in arrs.values()):
        raise StateRecordError("encode_rows needs arrays with one common leading batch axis")
    B = sizes.pop()
    lay = _encode_layout(arrs, meta, batched=True)
    data = np.concatenate([np.ascontiguousarray(arrs[n], dtype=dt).reshape(B, -1).view(np.uint8)
                           for n, dt, _, _, _ in lay.fields], axis=1) if lay.fields else np.zeros((B, 0), np.uint8)
    head = lay.head + lay.pack_meta(meta)
    head_crc = zlib.crc32(head)
    out = []
    for row in data:  # one bytes object per user is the output itself
        tail = row.tobytes()
        out.append(b"".join((_PREFIX.pack(MAGIC, VERSION, 0, lay.fp, zlib.crc32(tail, head_crc), len(head) + len(tail)),
                             head, tail)))
    return out


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
    lay = _DECODE_LAYOUTS.get((fp, body_len))
    if lay is not None:
        hit = lay.read(body)
        if hit is not None:
            return hit
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
    lay = _layout([(n, _norm_dtype(dt), tuple(shape)) for n, dt, shape in specs], list(meta))
    if lay.fp == fp and lay.body_len == body_len and lay.read(body) is not None:  # remember a layout only
        if len(_DECODE_LAYOUTS) >= _CACHE_MAX:  # when it reads this very record back
            _DECODE_LAYOUTS.clear()
        _DECODE_LAYOUTS[(fp, body_len)] = lay
    return arrays, meta


def decode_rows(blobs: Sequence[bytes]) -> tuple[list[int], Arrays, list[Meta]]:
    """Vectorized `decode` of the records of the most common cached layout among `blobs`:
    (positions decoded, arrays stacked along a new leading axis in that order, their metas).
    Every record is still checked (magic, version, flags, length, crc, header); the others (other
    layouts, unseen layouts, bad records) are left to `decode`, which raises the precise error."""
    keys: list[tuple[int, int] | None] = []
    for blob in blobs:
        if isinstance(blob, bytes) and len(blob) >= _PREFIX.size:
            magic, version, flags, fp, _, body_len = _PREFIX.unpack_from(blob)
            ok = magic == MAGIC and version == VERSION and flags == 0 and len(blob) - _PREFIX.size == body_len
            keys.append((fp, body_len) if ok and (fp, body_len) in _DECODE_LAYOUTS else None)
        else:
            keys.append(None)
    counts: dict[tuple[int, int], int] = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    if not counts:
        return [], {}, []
    key = max(counts, key=counts.__getitem__)
    lay = _DECODE_LAYOUTS[key]
    n_head = len(lay.head)
    pos, bodies, metas = [], [], []
    for i, (k, blob) in enumerate(zip(keys, blobs, strict=True)):
        if k != key:
            continue
        body = memoryview(blob)[_PREFIX.size :]
        if zlib.crc32(body) != _PREFIX.unpack_from(blob)[4] or body[:n_head] != lay.head:
            continue
        vals = lay.meta_struct.unpack_from(body, n_head)
        if vals[0::2] != lay.meta_tags:
            continue
        pos.append(i)
        bodies.append(body)
        metas.append(dict(zip(lay.meta_names, vals[1::2], strict=True)))
    if not pos:
        return [], {}, []
    data = np.frombuffer(b"".join(bodies), np.uint8).reshape(len(pos), lay.body_len)
    arrays = {name: data[:, off : off + dt.itemsize * count].copy().view(dt).reshape((len(pos), *shape))
              for name, dt, shape, off, count in lay.fields}
    return pos, arrays, metas
