"""state.codec.StateCodec: a batch's stored rows <-> stacked (B, ...) tensors, item indices remapped
from the table a row was written under to the current one (no model, no broker)."""

from __future__ import annotations

import numpy as np
import torch

from livemb.core.items import ItemTable
from livemb.state.codec import StateCodec, items_key
from livemb.state.record import decode, encode

IDS = np.array([f"i{k}" for k in range(6)])
TABLE = ItemTable(IDS, np.arange(12, dtype=np.float32).reshape(6, 2))
FIELDS = ("h", "mem_item", "win_item", "session")


def init(B: int) -> dict[str, torch.Tensor]:
    return {"h": torch.zeros(B, 3), "mem_item": torch.zeros(B, 4, dtype=torch.int64),
            "win_item": torch.zeros(B, 2, dtype=torch.int64), "session": torch.full((B,), -1)}


def state(B: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"h": torch.randn(B, 3, generator=g), "mem_item": torch.randint(0, 7, (B, 4), generator=g),
            "win_item": torch.randint(0, 7, (B, 2), generator=g), "session": torch.arange(B)}


def test_rows_round_trip_through_one_vectorized_group() -> None:
    codec = StateCodec()
    codec.add_table(TABLE)
    st = state(3, 0)
    rows = codec.encode(["a", "b", "c"], st, TABLE)
    decode(rows["a"])  # the layout is known from now on: the batch decoder takes every row at once
    stored = codec.decode(rows, FIELDS, TABLE)
    assert stored.rejected == {} and [names for names, _ in stored.groups] == [["a", "b", "c"]]
    back = codec.stack(stored, ["c", "new", "a", "b"], init(4))  # another order, and a user without a row
    for k, v in st.items():
        assert torch.equal(back[k][[2, 3, 0]], v)
        assert torch.equal(back[k][1], init(1)[k][0])  # the new user keeps the initial state


def test_rows_of_an_older_table_are_remapped_by_item_id() -> None:
    codec = StateCodec()
    codec.add_table(TABLE)
    st = state(2, 1)
    old_rows = codec.encode(["a", "b"], st, TABLE)
    decode(old_rows["a"])
    # the new catalogue: reversed order, i5 dropped, i9 added
    new = ItemTable(np.array(["i9", "i4", "i3", "i2", "i1", "i0"]), np.ones((6, 2), np.float32))
    codec.add_table(new)
    fresh = codec.encode(["c"], state(1, 2), new)  # a row already written under the new table
    stored = codec.decode({**old_rows, **fresh}, FIELDS, new)
    back = codec.stack(stored, ["a", "b", "c"], init(3))
    for k in ("mem_item", "win_item"):
        want = new.lookup(TABLE.id_of(st[k].numpy().ravel())).reshape(st[k].shape)  # i5 -> 0 (unknown)
        assert np.array_equal(back[k][:2].numpy(), want)
        assert torch.equal(back[k][2], state(1, 2)[k][0])  # already in the new indices: untouched
    assert torch.equal(back["h"][:2], st["h"])  # only item indices change


def test_rows_of_a_forgotten_table_keep_only_unknown_items() -> None:
    codec = StateCodec()
    codec.add_table(TABLE)
    gone = ItemTable(IDS[::-1].copy(), np.zeros((6, 2), np.float32))  # never served by this process
    st = state(1, 3)
    row = encode({k: v[0].numpy() for k, v in st.items()}, {"items": items_key(gone)})
    back = codec.stack(codec.decode({"a": row}, FIELDS, TABLE), ["a"], init(1))
    assert int(back["mem_item"].abs().sum()) == 0 and int(back["win_item"].abs().sum()) == 0
    assert torch.equal(back["h"], st["h"])


def test_another_models_row_and_junk_are_refused_per_user() -> None:
    codec = StateCodec()
    codec.add_table(TABLE)
    good = codec.encode(["good"], state(1, 4), TABLE)
    other = encode({"hist": np.zeros(3, np.int64)}, {"count": 3})
    stored = codec.decode({"foreign": other, **good, "junk": b"not a record"}, FIELDS, TABLE)
    assert set(stored.rejected) == {"foreign", "junk"} and "another model" in stored.rejected["foreign"]
    assert [names for names, _ in stored.groups] == [["good"]]
