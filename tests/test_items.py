from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from livemb.core.errors import DataError
from livemb.core.items import ItemTable


def _table(n: int = 5, d: int = 4) -> ItemTable:
    rng = np.random.default_rng(0)
    return ItemTable(np.array([f"i{k}" for k in range(n)]), rng.normal(size=(n, d)).astype(np.float32))


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "items.npz"
    np.savez(path, **arrays)
    return path


def test_round_trip_and_properties(tmp_path: Path) -> None:
    t = _table()
    path = t.save(tmp_path / "sub" / "items.npz")
    u = ItemTable.load(path)
    np.testing.assert_array_equal(u.ids, t.ids)
    np.testing.assert_array_equal(u.vectors, t.vectors)
    assert len(u) == 5 and u.dim == 4
    assert u.fingerprint == t.fingerprint and len(t.fingerprint) == 16
    changed = ItemTable(t.ids, t.vectors + 1)
    assert changed.fingerprint != t.fingerprint
    pv = t.padded_vectors()
    assert pv.shape == (6, 4) and pv.dtype == np.float32
    assert not pv[0].any()
    np.testing.assert_array_equal(pv[1:], t.vectors)
    with pytest.raises(ValueError):  # read-only arrays: the table is immutable
        t.vectors[0, 0] = 1.0


def test_conversions() -> None:
    t = ItemTable(np.array([10, 20, 3]), np.ones((3, 2), dtype=np.float64))
    assert t.ids.tolist() == ["10", "20", "3"]
    assert t.vectors.dtype == np.float32
    assert ItemTable(np.array([1.0, 2.0]), np.ones((2, 2))).ids.tolist() == ["1", "2"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"ids": np.array(["a"])}, r"missing key\(s\) \['vectors'\]"),
        ({"ids": np.array(["a", "b"]), "vectors": np.ones(2, np.float32)}, "vectors must be 2-D"),
        ({"ids": np.array(["a", "b"]), "vectors": np.ones((3, 2), np.float32)}, "length mismatch: 2 ids but 3"),
        ({"ids": np.array(["a", "b"]), "vectors": np.ones((2, 2), np.int64)}, "must be floating point"),
        ({"ids": np.array([], dtype=str), "vectors": np.ones((0, 2), np.float32)}, "empty item table"),
        (
            {"ids": np.array(["a", "b", "c"]), "vectors": np.array([[1, np.nan], [0, 1], [np.inf, 0]], np.float32)},
            r"non-finite values \(NaN/inf\) in 2 rows",
        ),
        (
            {"ids": np.array(["a", "b", "a", "c", "c"]), "vectors": np.ones((5, 2), np.float32)},
            r"2 duplicate ids, e.g. \['a', 'c'\]",
        ),
    ],
)
def test_load_validation(tmp_path: Path, arrays: dict, message: str) -> None:
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        ItemTable.load(path)
    assert str(path) in str(err.value)


def test_load_other_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="item table not found"):
        ItemTable.load(tmp_path / "missing.npz")
    path = _npz(tmp_path, ids=np.array(["a", 1], dtype=object), vectors=np.ones((2, 2), np.float32))
    with pytest.raises(DataError, match="object array"):
        ItemTable.load(path)
    path = _npz(tmp_path, ids=np.array(["a", "b"]), vectors=np.ones((2, 2), np.float32),
                categories=np.array(["x", 1], dtype=object))
    with pytest.raises(DataError, match="categories are stored as an object array"):
        ItemTable.load(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        ItemTable.load(junk)


def test_duplicate_list_is_capped() -> None:
    ids = np.repeat(np.array([f"d{k}" for k in range(8)]), 2)
    with pytest.raises(DataError, match=r"8 duplicate ids, e.g. \['d0', 'd1', 'd2', 'd3', 'd4'\]$"):
        ItemTable(ids, np.ones((16, 2), np.float32))


def test_lookup_and_id_of() -> None:
    t = _table()
    idx = t.lookup(np.array(["i3", "nope", "i0", "i4", ""]))
    assert idx.dtype == np.int64
    assert idx.tolist() == [4, 0, 1, 5, 0]
    assert t.id_of(idx).tolist() == ["i3", "", "i0", "i4", ""]
    assert t.lookup(["i1"]).tolist() == [2]
    np.testing.assert_array_equal(t.padded_vectors()[t.lookup(["i2"])][0], t.vectors[2])
    ints = ItemTable(np.array(["5", "17"]), np.ones((2, 2), np.float32))
    assert ints.lookup(np.array([17, 5, 6])).tolist() == [2, 1, 0]
    with pytest.raises(IndexError):
        t.id_of([6])


def test_lookup_is_fast() -> None:
    n = 50_000
    t = ItemTable(np.array([f"item{k}" for k in range(n)]), np.zeros((n, 2), np.float32))
    rng = np.random.default_rng(0)
    k = rng.integers(0, n + n // 10, size=100_000)
    query = np.array([f"item{x}" for x in k])
    t.lookup(query[:10])  # builds the hash index once
    start = time.perf_counter()
    idx = t.lookup(query)
    assert time.perf_counter() - start < 1.0
    expected = np.where(k < n, k + 1, 0)
    np.testing.assert_array_equal(idx, expected)


def test_lookup_of_a_few_ids_equals_the_vectorised_lookup() -> None:
    n = 500
    t = ItemTable(np.array([f"item{k}" for k in range(n)]), np.zeros((n, 2), np.float32))
    rng = np.random.default_rng(1)
    many = np.array([f"item{x}" for x in rng.integers(0, n + 50, size=400)] + ["", "nope"])
    want = t.lookup(many)  # above the few-ids bound: get_indexer
    assert (want == 0).any() and (want > 0).any()
    for j in range(0, len(many), 7):  # the same ids a few at a time: one hash probe each
        np.testing.assert_array_equal(t.lookup(many[j:j + 7]), want[j:j + 7])
    assert t.lookup(np.array([["item3", "x"], ["item0", "item4"]])).tolist() == [[4, 0], [1, 5]]
    assert t.lookup(np.array([], dtype=str)).tolist() == []


def test_categories_round_trip_codes_and_fingerprint(tmp_path: Path) -> None:
    t = _table()
    cats = np.array(["shoes", "", "bags", "shoes", "bags"])
    c = ItemTable(t.ids, t.vectors, cats)
    u = ItemTable.load(c.save(tmp_path / "items.npz"))
    np.testing.assert_array_equal(u.categories, cats)
    assert u.fingerprint == c.fingerprint
    # a table without categories keeps its hash; categories (and each one of them) change it
    assert ItemTable.load(t.save(tmp_path / "plain.npz")).categories is None
    assert c.fingerprint != t.fingerprint
    assert ItemTable(t.ids, t.vectors, np.array(["shoes", "", "bags", "bags", "bags"])).fingerprint != c.fingerprint
    # codes by sorted name (bags 1, shoes 2), 0 for row 0 and the item without one
    assert c.category_codes().tolist() == [0, 2, 0, 1, 2, 1]
    assert ItemTable(t.ids, t.vectors, np.array([7, 7, 3, 3, 9])).category_codes().tolist() == [0, 2, 2, 1, 1, 3]
    assert t.category_codes() is None
    with pytest.raises(DataError, match="one per item"):
        ItemTable(t.ids, t.vectors, cats[:3])
    with pytest.raises(DataError, match="categories are non-integer floats"):
        ItemTable(t.ids, t.vectors, np.array([1.0, np.nan, 2.0, 3.0, 4.0]))
