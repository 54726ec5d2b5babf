"""The live micro-batch step around the model: gather states, ONE model step, ONE faiss search, scatter.

Called by the batch step (stream/batch.py, step 5) with the batch's applied events (arrival order) and the
users' stored state blobs. Everything here is batched: item lookups are one vectorized call for the
batch, states are stacked per field into (B, ...) tensors, the model advances every user at once
(loops over events-per-user only), and there is one device->host copy of the results.

Hot swap: the model checkpoint and the items file are re-read when their mtime changes (checked
at most every `reload_check_s` between batches). The new model/index are built aside and swapped
in one assignment. A stored state written under an older item table has its item indices remapped
by item id (the previous table is kept for that); unknown ids become "unknown item".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from core.events import ValidEvent
from core.items import ItemTable
from core.settings import Settings
from models.base import EventBatch, event_type_index
from models.grouping import group_by_user
from models.serving import Serving, build_messages
from state.record import StateRecordError, decode, decode_rows, encode_rows
from stream.ports import ModelInfo, StepResult

log = logging.getLogger("livemb.processor")

Decoded = tuple[list[str], dict[str, np.ndarray]]  # users, their stored states stacked per field
INDEX_FIELDS = ("mem_item", "win_item")  # state tensors that hold item indices (remapped on swap)


def items_key(table: ItemTable) -> int:
    return int(table.fingerprint[:15], 16)  # fits an int64 meta field


class ForeignState(ValueError):
    """A stored state this model cannot continue (another model's fields)."""


class ModelProcessor:
    """BatchProcessor (stream/ports.py) around a served model; hot swap between batches."""

    def __init__(self, settings: Settings, reload_check_s: float | None = None):
        if not settings.model_path or not settings.items_path:
            raise ValueError("the worker needs --model CKPT and --items ITEMS")
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.device = torch.device(settings.resolved_device())
        self.reload_check_s = settings.reload_check_s if reload_check_s is None else reload_check_s
        self._next_check = 0.0
        self._refused: tuple[float, float] | None = None  # stamps of a refused file set: not retried
        self.reload_counts = {"ok": 0, "refused": 0}  # livemb_model_reloads_total (stream/app.py)
        self.tables: dict[int, ItemTable] = {}  # every item table served so far, for remapping old rows
        self.serving, self.stamps = self._load()

    @property
    def ready(self) -> bool:
        return True  # the constructor raises unless a model is loaded

    # ------------------------------------------------------------------ loading / hot swap
    def _stamps(self) -> tuple[float, float]:
        return (os.stat(self.settings.model_path).st_mtime, os.stat(self.settings.items_path).st_mtime)

    def _load(self) -> tuple[Serving, tuple[float, float]]:
        s = self.settings
        stamps = self._stamps()
        sv = Serving.load(s.model_path, s.items_path, index=s.index, topk=s.topk, exclude_seen=s.exclude_seen,
                          device=str(self.device), allow_new_items=True,
                          index_path=s.index_path, stale_index="rebuild" if hasattr(self, "serving") else "refuse")
        self.tables[items_key(sv.table)] = sv.table
        log.info("serving %s on %s, items %s (%d x %d), index %s", sv.tag, self.device, sv.table.fingerprint,
                 len(sv.table), sv.table.dim, s.index)
        return sv, stamps

    def request_reload(self) -> None:
        """SIGHUP: the next `maybe_reload` (the worker's 0.25 s timer or the next batch) checks at once."""
        self._next_check = 0.0

    def maybe_reload(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.reload_check_s
        try:
            stamps = self._stamps()
        except OSError as e:  # e.g. a deploy tool between unlink and rename: look again next time
            log.warning("hot swap check: %s; keeping %s", e, self.serving.tag)
            return False
        if stamps in (self.stamps, self._refused):
            return False
        try:
            new, stamps = self._load()
        except Exception as e:  # noqa: BLE001 - a bad new file must not stop serving the old one
            self._refused = stamps  # retried only once a file changes again
            self.reload_counts["refused"] += 1
            log.error("hot swap refused, keeping %s: %s", self.serving.tag, e)
            return False
        self.serving, self.stamps = new, stamps  # a batch sees either the old or the new set
        self.reload_counts["ok"] += 1
        return True

    def model_info(self) -> ModelInfo:
        """For the livemb_model_info metric; changes on a hot swap."""
        name, _, version = self.serving.tag.partition("@")
        return ModelInfo(name, f"{version}/items:{self.serving.table.fingerprint}", str(self.device))

    # ------------------------------------------------------------------ state <-> tensors
    def _decode(self, user: str, blob: bytes, sv: Serving) -> dict[str, np.ndarray]:
        """One stored state as arrays in the served item table's indices; raises per user."""
        arrays, meta = decode(blob)
        spec = sv.model.state_spec()
        if set(arrays) != set(spec):
            raise ForeignState(f"stored state was written by another model (fields {sorted(arrays)[:4]}...)")
        if meta.get("items") != items_key(sv.table):
            self._remap(arrays, meta.get("items"), sv.table)
        return arrays

    def _decode_all(self, blobs: dict[str, bytes], sv: Serving) -> tuple[list[Decoded], dict[str, str]]:
        """The stored states of a batch: the rows of the common layout in one vectorized pass
        (`decode_rows`), any other row one by one (another layout, or an error isolated to its
        user). Returns groups of (users, stacked arrays) and the refused users with the reason."""
        users = list(blobs)
        pos, arrays, metas = decode_rows([blobs[u] for u in users])
        groups: list[Decoded] = []
        rejected: dict[str, str] = {}
        if pos:
            spec = sv.model.state_spec()
            if set(arrays) == set(spec):
                here = items_key(sv.table)
                for old in {m.get("items") for m in metas} - {here}:  # rows written under another item table
                    rows = np.array([j for j, m in enumerate(metas) if m.get("items") == old])
                    part = {k: v[rows] for k, v in arrays.items()}
                    self._remap(part, old, sv.table)
                    for k in INDEX_FIELDS:
                        if k in arrays:
                            arrays[k][rows] = part[k]
                groups.append(([users[j] for j in pos], arrays))
            else:
                why = f"stored state was written by another model (fields {sorted(arrays)[:4]}...)"
                rejected.update({users[j]: why for j in pos})
        done = set(pos)
        for j, user in enumerate(users):
            if j in done:
                continue
            try:
                one = self._decode(user, blobs[user], sv)
            except (StateRecordError, ForeignState) as e:  # isolated to this user
                rejected[user] = str(e)
                continue
            groups.append(([user], {k: v[None] for k, v in one.items()}))
        return groups, rejected

    def _gather(self, groups: list[Decoded], users: Sequence[str], sv: Serving) -> dict[str, torch.Tensor]:
        """The users' stored states as (B, ...) tensors, one copy per field and group (in the
        steady state one group); new users keep init_state."""
        st = sv.model.init_state(len(users))
        at = {u: b for b, u in enumerate(users)}
        for names, arrays in groups:
            keep = [j for j, u in enumerate(names) if u in at]
            if not keep:
                continue
            idx = torch.tensor([at[names[j]] for j in keep], device=self.device)
            sel = keep if len(keep) < len(names) else slice(None)
            for k in sv.model.state_spec():
                st[k][idx] = torch.from_numpy(np.ascontiguousarray(arrays[k][sel])).to(self.device)
        return st

    def _remap(self, arrays: dict[str, np.ndarray], old_key: int | None, table: ItemTable) -> None:
        old = self.tables.get(old_key) if old_key is not None else None
        for k in INDEX_FIELDS:
            if k in arrays:
                a = arrays[k]  # any shape: (M,) for one user, (n, M) for a group
                arrays[k] = (table.lookup(old.id_of(a.ravel())).reshape(a.shape).astype(a.dtype) if old is not None
                             else np.zeros_like(a))

    def _scatter(self, users: Sequence[str], st: dict[str, torch.Tensor], sv: Serving) -> dict[str, bytes]:
        host = {k: v.cpu().numpy() for k, v in st.items()}  # one copy per field for the whole batch
        meta = {"items": items_key(sv.table)}
        return dict(zip(users, encode_rows(host, meta), strict=True))  # one byte matrix for the batch

    # ------------------------------------------------------------------ the batch
    def process(self, events: list[ValidEvent], states: dict[str, bytes | None]) -> StepResult:
        self.maybe_reload()
        sv = self.serving
        decoded, rejected = self._decode_all({u: b for u, b in states.items() if b is not None}, sv)
        if rejected:
            events = [e for e in events if e.user_id not in rejected]
        if not events:
            return StepResult(states={}, outputs=[], rejected=rejected)
        users, seqs, unknown = self._sequences(events, sv.table)
        st = self._gather(decoded, users, sv)
        before = st["session"].clone()
        t0 = time.perf_counter()
        st, u = sv.advance(st, EventBatch.from_sequences(*seqs))
        t1 = time.perf_counter()
        event_ts = np.fromiter((int(t[-1]) for t in seqs[2]), np.int64, len(users))
        messages = sv.messages(users, st, u, event_ts, emitted_at=int(time.time() * 1000))
        t2 = time.perf_counter()
        return StepResult(
            states=self._scatter(users, st, sv),
            outputs=list(messages),
            rejected=rejected,
            unknown_items=unknown,
            sessions_started=int((st["session"] - before).sum()),
            model_step_seconds=t1 - t0,
            topk_seconds=t2 - t1,
        )

    def idle_messages(self, states: dict[str, bytes], last_ts: dict[str, int]) -> list[tuple[str, bytes]]:
        """The idle-session sweep (stream/sweep.py): for each user, a message whose embedding is the
        model's next-session embedding (the open session folded in). [] for models without sessions."""
        sv = self.serving
        decoded, rejected = self._decode_all(states, sv)
        for user, why in rejected.items():
            log.warning("idle sweep skips user %r: %s", user, why)
        users = [u for u in states if u not in rejected]
        if not users:
            return []
        st = self._gather(decoded, users, sv)
        with torch.no_grad():
            nxt = sv.model.next_session_embedding(st)
        if nxt is None:
            return []
        items, scores = sv.retriever.candidates(sv.model, st, nxt)
        event_ts = np.array([last_ts[u] for u in users], np.int64)
        # marked, so a consumer keeping "the user's last in-session embedding" can tell them apart
        return list(build_messages(users, nxt, st, items, scores, sv.table, event_ts, sv.tag, int(time.time() * 1000),
                                   nxt, extra={"session_closed": True}))

    @staticmethod
    def _sequences(events: Sequence[ValidEvent], table: ItemTable):
        """Group the batch by user (arrival order kept) into per-user (items, etypes, ts) arrays."""
        n = len(events)
        item_idx = table.lookup(np.array([e.item_id for e in events], dtype=object))
        etype = event_type_index([e.event_type for e in events])
        ts = np.fromiter((e.ts for e in events), np.int64, n)
        users, groups = group_by_user(np.array([e.user_id for e in events], dtype=object))
        seqs = ([item_idx[g] for g in groups], [etype[g] for g in groups], [ts[g] for g in groups])
        return [str(x) for x in users], seqs, int((item_idx == 0).sum())
