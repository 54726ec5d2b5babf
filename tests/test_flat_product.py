"""The flat product's layout (models/flat_product.py): the same scores either way, a copy that
follows the item vectors, and a timed choice that keeps no copy unless it is faster."""

import logging

import pytest
import torch

from livemb.models.flat_product import LAYOUTS, FlatProduct


def vectors(n=3001, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    v[0] = 0  # row 0: the padding item, as in SeqModel.item_vecs
    return v


@pytest.mark.parametrize("users", [2, 7, 64])
def test_item_major_copy_gives_the_same_scores(users):
    v = vectors()
    u = torch.randn(users, v.shape[1], generator=torch.Generator().manual_seed(1))
    got = {}
    for layout in LAYOUTS:
        p = FlatProduct()
        assert p.choose(v, layout) == layout
        out = torch.empty(users, v.shape[0] + 5)[:, : v.shape[0]]  # a strided view, like the score buffer's
        p(u, v, out=out)
        got[layout] = out.clone()
    torch.testing.assert_close(got["items"], got["rows"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got["rows"], u @ v.T, rtol=0, atol=0)


def test_the_copy_follows_replaced_and_edited_vectors():
    v = vectors()
    u = torch.randn(3, v.shape[1])
    p = FlatProduct()
    p.choose(v, "items")
    out = torch.empty(3, v.shape[0])
    copy = p._items_major
    p(u, v, out=out)
    assert p._items_major is copy  # the same vectors: the copy is made once, not per batch
    v.mul_(2.0)  # edited in place after the choice
    torch.testing.assert_close(p(u, v, out=out), u @ v.T, rtol=1e-6, atol=1e-5)
    w = vectors(n=500, seed=5)  # replaced by another catalogue (a hot swap)
    out = torch.empty(3, w.shape[0])
    torch.testing.assert_close(p(u, w, out=out), u @ w.T, rtol=1e-6, atol=1e-5)


def test_auto_times_both_layouts_and_keeps_a_copy_only_when_chosen(caplog):
    v = vectors(n=20_001, d=32)
    p = FlatProduct()
    with caplog.at_level(logging.INFO, logger="livemb.models.flat_product"):
        layout = p.choose(v)
    assert layout in LAYOUTS
    assert set(p.timings) == set(LAYOUTS) and all(t > 0 for t in p.timings.values())
    assert (p._items_major is not None) == (layout == "items")
    assert f"{layout} layout" in caplog.text
    if layout == "items":  # the copy is kept for a clear gain only
        assert p.timings["items"] < 0.85 * p.timings["rows"]


def test_forced_rows_keeps_no_copy_and_unknown_layouts_are_refused():
    v = vectors()
    p = FlatProduct()
    p.choose(v, "items")
    assert p._items_major is not None
    p.choose(v, "rows")
    assert p._items_major is None
    with pytest.raises(ValueError, match="auto, rows, items"):
        p.choose(v, "columns")
