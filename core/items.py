"""The item table (SPEC section 4): `items.npz` with `ids` (N) and `vectors` (float32 N x D), and
optionally `categories` (N strings, "" = none): a fixed item attribute the repeat path's slot scorer
reads when the table has it (docs/MODELS.md "Item categories").

Index convention used everywhere (models, state, retrieval): item index 0 means "unknown item",
known items are 1..N in table order, so `padded_vectors()[lookup(ids)]` is always valid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from livemb.core.errors import DataError

_FEW_IDS = 64  # up to this many ids per lookup: one hash probe each (get_loc) instead of get_indexer


def _ids_to_str(ids: np.ndarray, what: str = "item ids") -> np.ndarray:
    """Ids as a numpy str array; integer ids (or integral floats) become their decimal string."""
    ids = np.asarray(ids)
    if ids.dtype.kind == "S":
        return np.char.decode(ids, "utf-8").astype(str)
    if ids.dtype.kind in "iu":
        return ids.astype(str)
    if ids.dtype.kind == "f":
        if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
            raise DataError(f"{what} are non-integer floats; store them as strings or integers")
        return ids.astype(np.int64).astype(str)
    if ids.dtype.kind == "b":
        raise DataError(f"{what} are booleans; store them as strings or integers")
    return ids.astype(str)


def _validate(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    vectors = np.asarray(vectors)
    if ids.ndim != 1:
        raise DataError(f"ids must be 1-D, got shape {ids.shape}")
    if vectors.ndim != 2:
        raise DataError(f"vectors must be 2-D (N x D), got shape {vectors.shape}")
    if len(ids) == 0 or vectors.shape[0] == 0:
        raise DataError("empty item table (no items)")
    if vectors.shape[1] == 0:
        raise DataError("vectors have 0 columns (D = 0)")
    if len(ids) != vectors.shape[0]:
        raise DataError(f"length mismatch: {len(ids)} ids but {vectors.shape[0]} vector rows")
    if vectors.dtype.kind != "f":
        raise DataError(f"vectors must be floating point (float32), got dtype {vectors.dtype}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # float64/16 -> float32
    bad_rows = ~np.isfinite(vectors).all(axis=1)
    if bad_rows.any():
        raise DataError(
            f"vectors contain non-finite values (NaN/inf) in {int(bad_rows.sum())} rows "
            f"(first rows: {np.flatnonzero(bad_rows)[:5].tolist()})"
        )
    ids = _ids_to_str(ids)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dups = uniq[counts > 1]
        raise DataError(f"{len(dups)} duplicate ids, e.g. {dups[:5].tolist()}")
    return ids, vectors


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Immutable item catalogue; arrays are validated, converted and made read-only on creation."""

    ids: np.ndarray
    vectors: np.ndarray
    categories: np.ndarray | None = None  # (N,) str, "" = no category; None: the table has none

    def __post_init__(self) -> None:
        ids, vectors = _validate(self.ids, self.vectors)
        ids.flags.writeable = False
        vectors.flags.writeable = False
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "vectors", vectors)
        if self.categories is not None:
            cats = np.asarray(self.categories)
            if cats.shape != ids.shape:
                raise DataError(f"categories must be one per item ({len(ids)}), got shape {cats.shape}")
            cats = _ids_to_str(cats, "categories")
            cats.flags.writeable = False
            object.__setattr__(self, "categories", cats)

    @classmethod
    def load(cls, path: str | Path) -> ItemTable:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: item table not found")
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # .npz is a zip archive; anything else would hit np.load's pickle path
                raise DataError(f"{path}: not a readable .npz file (expected a zip archive with 'ids' and 'vectors')")
        try:
            # No pickle: an items file is data, never code.
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("ids", "vectors") if k not in z.files]
                if missing:
                    raise DataError(
                        f"missing key(s) {missing}; the file has {z.files} (expected 'ids' and 'vectors')"
                    )
                ids, vectors = z["ids"], z["vectors"]
                categories = z["categories"] if "categories" in z.files else None
        except ValueError as e:
            if "allow_pickle" in str(e):
                e = ValueError("ids or categories are stored as an object array; save them as numpy str arrays")
            raise DataError(f"{path}: {e}") from None
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        try:
            return cls(ids, vectors, categories)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write `.npz` (numpy appends the suffix when missing; the real path is returned)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.categories is None else {"categories": self.categories}
        np.savez(path, ids=self.ids, vectors=self.vectors, **extra)
        return path

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @cached_property
    def fingerprint(self) -> str:
        """Content hash (ids, vectors and categories when present) used as `items_version`."""
        h = hashlib.sha256()
        h.update("\n".join(self.ids.tolist()).encode("utf-8"))
        h.update(b"\0")
        h.update(self.vectors.tobytes())
        if self.categories is not None:  # a table without them keeps the hash it always had
            h.update(b"\0categories\0")
            h.update("\n".join(self.categories.tolist()).encode("utf-8"))
        return h.hexdigest()[:16]

    def category_codes(self) -> np.ndarray | None:
        """(N+1,) int64, read-only: each item's category as a code 1..C (sorted category names), 0
        for row 0 and items without one; None when the table has no categories."""
        return self._category_codes

    @cached_property
    def _category_codes(self) -> np.ndarray | None:  # computed once per table (every model built on it asks)
        if self.categories is None:
            return None
        names, codes = np.unique(self.categories, return_inverse=True)
        codes = codes.astype(np.int64) + 1
        if names[0] == "":  # sorted first: the empty name is "no category"
            codes = np.where(codes == 1, 0, codes - 1)
        out = np.concatenate([[0], codes]).astype(np.int64)
        out.flags.writeable = False
        return out

    def padded_vectors(self) -> np.ndarray:
        """(N+1) x D float32 with row 0 all zeros for the unknown item (a fresh, writable copy)."""
        out = np.zeros((len(self) + 1, self.dim), dtype=np.float32)
        out[1:] = self.vectors
        return out

    @cached_property
    def _index(self) -> pd.Index:
        return pd.Index(self.ids.astype(object))

    @cached_property
    def _padded_ids(self) -> np.ndarray:
        return np.concatenate([np.array([""]), self.ids]).astype(self.ids.dtype)

    def lookup(self, ids: np.ndarray | list | pd.Series) -> np.ndarray:
        """1-based index of each id (int64), 0 for ids not in the table. Hash lookup, vectorised."""
        q = np.asarray(ids)
        if q.ndim == 0:
            q = q.reshape(1)
        if q.dtype.kind in "iuf" or q.dtype.kind == "S":
            q = _ids_to_str(q)
        if q.size <= _FEW_IDS:  # a live batch: get_indexer's index of the query alone cost ~0.1-0.7 ms
            get = self._index.get_loc
            out = np.zeros(q.size, np.int64)
            for j, x in enumerate(q.ravel().tolist()):
                try:
                    out[j] = get(x) + 1
                except KeyError:
                    pass
            return out.reshape(q.shape)
        return (self._index.get_indexer(q.astype(object)) + 1).astype(np.int64)

    def id_of(self, index: np.ndarray | list) -> np.ndarray:
        """Inverse of lookup: ids for 1-based indices, '' for index 0."""
        idx = np.asarray(index, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() > len(self)):
            raise IndexError(f"item index out of range 0..{len(self)}")
        return self._padded_ids[idx]
