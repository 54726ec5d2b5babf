"""A batch's stored state rows <-> the stacked (B, ...) tensors one model step takes, and back.

Rows of the common layout are decoded in one vectorized pass (`state.record.decode_rows`), the
rest one by one, so a bad row refuses only its own user. Item indices in a row (`INDEX_FIELDS`)
point into the item table the row was written under (its `items` meta): rows written under an
older table are remapped by item id to the current one, and ids it lacks become the unknown item
(0). Every table served so far is kept for that; the open catalogue's new items that the current
table now knows move from the row's pool into its memory (`models.newitems.absorb`). The codec knows no model: the caller gives the
state's field names and its initial tensors (`SeqModel.state_spec` / `init_state`); `optional`
fields (the worker's own `REC_FIELD`) may be missing from a row written before they existed, and
then keep their initial value.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from livemb.core.errors import DataError
from livemb.core.items import ItemTable
from livemb.models import newitems
from livemb.state.record import StateRecordError, decode, decode_rows, encode_rows

REC_FIELD = "rec_item"  # the worker's copy of the user's last published candidates (stream/quality.py)
INDEX_FIELDS = ("mem_item", "win_item", REC_FIELD)  # state fields holding item indices (remapped on a table swap)


def items_key(table: ItemTable) -> int:
    return int(table.fingerprint[:15], 16)  # fits an int64 meta field


class ForeignState(DataError):
    """A stored state this model cannot continue (another model's fields)."""


def _fits(names: Collection[str], fields: Collection[str], optional: Collection[str]) -> bool:
    """A row of these field names is this model's: all of `fields`, of which `optional` may be missing."""
    have, want = set(names), set(fields)
    return have <= want and want - have <= set(optional)


def _foreign(fields: Collection[str]) -> str:
    return f"stored state was written by another model (fields {sorted(fields)[:4]}...)"


@dataclass
class StoredStates:
    """The decoded rows of a batch: groups of (users, their arrays stacked per field), in the
    current table's item indices (in the steady state one group), and the refused users."""

    groups: list[tuple[list[str], dict[str, np.ndarray]]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # user -> why their row was refused


class StateCodec:
    def __init__(self) -> None:
        self.tables: dict[int, ItemTable] = {}  # every item table served so far, for remapping old rows

    def add_table(self, table: ItemTable) -> None:
        self.tables[items_key(table)] = table

    def decode(self, blobs: dict[str, bytes], fields: Collection[str], table: ItemTable,
               optional: Collection[str] = ()) -> StoredStates:
        """The users' rows (none None) as arrays in `table`'s item indices; `fields`: the names the
        served model's state has (a row with other fields is refused as another model's), of
        which `optional` may be missing."""
        users = list(blobs)
        pos, arrays, metas = decode_rows([blobs[u] for u in users])
        out = StoredStates()
        if pos:
            if _fits(arrays, fields, optional):
                self._remap_rows(arrays, [m.get("items") for m in metas], table)
                out.groups.append(([users[j] for j in pos], arrays))
            else:
                out.rejected.update({users[j]: _foreign(arrays) for j in pos})
        done = set(pos)
        for j, user in enumerate(users):  # another layout, or an error isolated to this user
            if j in done:
                continue
            try:
                one = self._decode_one(blobs[user], fields, table, optional)
            except (StateRecordError, ForeignState) as e:
                out.rejected[user] = str(e)
                continue
            out.groups.append(([user], {k: v[None] for k, v in one.items()}))
        return out

    def stack(self, stored: StoredStates, users: Sequence[str], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`init` (the model's initial state for `users`, (B, ...) each) with the stored rows of the
        users that have one copied in: one index and one host->device copy per field and group."""
        at = {u: b for b, u in enumerate(users)}
        device = next(iter(init.values())).device if init else None
        for names, arrays in stored.groups:
            keep = [j for j, u in enumerate(names) if u in at]
            if not keep:
                continue
            idx = torch.tensor([at[names[j]] for j in keep], device=device)
            sel = keep if len(keep) < len(names) else slice(None)
            for k, a in arrays.items():
                init[k][idx] = torch.from_numpy(np.ascontiguousarray(a[sel])).to(init[k].device)
        return init

    def encode(self, users: Sequence[str], st: dict[str, torch.Tensor], table: ItemTable) -> dict[str, bytes]:
        """One row per user, tagged with `table` (one device->host copy per field for the batch)."""
        host = {k: v.cpu().numpy() for k, v in st.items()}
        return dict(zip(users, encode_rows(host, {"items": items_key(table)}), strict=True))

    # ------------------------------------------------------------------ item remap
    def _decode_one(self, blob: bytes, fields: Collection[str], table: ItemTable,
                    optional: Collection[str] = ()) -> dict[str, np.ndarray]:
        arrays, meta = decode(blob)
        if not _fits(arrays, fields, optional):
            raise ForeignState(_foreign(arrays))
        if meta.get("items") != items_key(table):
            self._remap(arrays, meta.get("items"), table)
            one = {k: v[None] for k, v in arrays.items()}  # views: absorbed in place
            newitems.absorb(one, table)
        return arrays

    def _remap_rows(self, arrays: dict[str, np.ndarray], keys: list[int | None], table: ItemTable) -> None:
        """Rows of a stacked group written under another table than `table`, per old table."""
        here = items_key(table)
        for old in set(keys) - {here}:
            rows = np.array([j for j, k in enumerate(keys) if k == old])
            part = {k: arrays[k][rows] for k in INDEX_FIELDS if k in arrays}
            self._remap(part, old, table)
            part.update({k: arrays[k][rows] for k in arrays if k not in part})
            newitems.absorb(part, table)  # the open catalogue's new items the table now knows
            for k, v in part.items():
                arrays[k][rows] = v

    def _remap(self, arrays: dict[str, np.ndarray], old_key: int | None, table: ItemTable) -> None:
        """Index fields from the table `old_key` names to `table`, by item id (any shape); a table
        no longer known (or no tag) leaves only unknown items. Negative entries (the open
        catalogue's new-item tags in `REC_FIELD`) name no table's item and are kept."""
        old = self.tables.get(old_key) if old_key is not None else None
        for k in INDEX_FIELDS:
            if k in arrays:
                a = arrays[k]
                new = (table.lookup(old.id_of(np.maximum(a, 0).ravel())).reshape(a.shape) if old is not None
                       else np.zeros(a.shape, np.int64))
                arrays[k] = np.where(a < 0, a, new).astype(a.dtype)
