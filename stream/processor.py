"""The live micro-batch step around the model: gather states, ONE model step, ONE faiss search, scatter.

Called by the Faust agent (stream/app.py) with the batch's applied events (arrival order) and the
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
from dataclasses import dataclass

import numpy as np
import torch

from models.base import EventBatch, SeqModel, event_type_index
from models.checkpoint import load_checkpoint, model_version
from state.record import decode, encode
from stream.publish import build_messages
from stream.retrieval import Retriever
from tools.items import ItemTable
from tools.settings import Settings

log = logging.getLogger("livemb.processor")

INDEX_FIELDS = ("mem_item", "win_item")  # state tensors that hold item indices (remapped on swap)


def items_key(table: ItemTable) -> int:
    return int(table.fingerprint[:15], 16)  # fits an int64 meta field


@dataclass
class Serving:
    """Everything one batch needs, swapped as a unit."""

    model: SeqModel
    table: ItemTable
    retriever: Retriever
    tag: str  # "<name>@<version>"
    stamps: tuple[float, float]


class ModelProcessor:
    ready = False

    def __init__(self, settings: Settings, reload_check_s: float = 2.0):
        if not settings.model_path or not settings.items_path:
            raise ValueError("the worker needs --model CKPT and --items ITEMS")
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.device = torch.device(settings.resolved_device())
        self.reload_check_s = reload_check_s
        self._next_check = 0.0
        self.tables: dict[int, ItemTable] = {}
        self.serving = self._load()
        self.ready = True

    # ------------------------------------------------------------------ loading / hot swap
    def _stamps(self) -> tuple[float, float]:
        return (os.stat(self.settings.model_path).st_mtime, os.stat(self.settings.items_path).st_mtime)

    def _load(self) -> Serving:
        s = self.settings
        stamps = self._stamps()
        table = ItemTable.load(s.items_path)
        model = load_checkpoint(s.model_path, table.padded_vectors(), table.fingerprint, allow_new_items=True)
        if not model.embeds:
            raise ValueError(f"model {model.name} has no user embedding; the worker serves embedding models")
        model.to(self.device).eval()
        retriever = Retriever(table.padded_vectors(), s.index, s.topk, s.exclude_seen)
        self.tables[items_key(table)] = table
        tag = f"{model.name}@{model_version(s.model_path)}"
        log.info("serving %s on %s, items %s (%d x %d), index %s", tag, self.device, table.fingerprint, len(table),
                 table.dim, s.index)
        return Serving(model, table, retriever, tag, stamps)

    def maybe_reload(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.reload_check_s
        try:
            if self._stamps() == self.serving.stamps:
                return False
            new = self._load()
        except Exception as e:  # noqa: BLE001 - a bad new file must not stop serving the old one
            log.error("hot swap refused, keeping %s: %s", self.serving.tag, e)
            return False
        self.serving = new  # one assignment: a batch sees either the old or the new set
        return True

    def model_info(self) -> tuple[str, str, str]:
        """(model, version, device) for the livemb_model_info metric; changes on a hot swap."""
        name, _, version = self.serving.tag.partition("@")
        return name, f"{version}/items:{self.serving.table.fingerprint}", str(self.device)

    # ------------------------------------------------------------------ state <-> tensors
    def _gather(self, users: Sequence[str], blobs: dict[str, bytes | None], sv: Serving) -> dict[str, torch.Tensor]:
        st = sv.model.init_state(len(users))
        spec = sv.model.state_spec()
        rows, decoded = [], []
        current = items_key(sv.table)
        for b, u in enumerate(users):
            blob = blobs.get(u)
            if blob is None:
                continue
            arrays, meta = decode(blob)
            if set(arrays) != set(spec):
                raise ValueError(f"stored state of {u!r} was written by another model ({sorted(arrays)[:4]}...)")
            if meta.get("items") != current:
                self._remap(arrays, meta.get("items"), sv.table)
            rows.append(b)
            decoded.append(arrays)
        if rows:
            idx = torch.tensor(rows, device=self.device)
            for k in spec:
                st[k][idx] = torch.from_numpy(np.stack([d[k] for d in decoded])).to(self.device)
        return st

    def _remap(self, arrays: dict[str, np.ndarray], old_key: int | None, table: ItemTable) -> None:
        old = self.tables.get(old_key) if old_key is not None else None
        for k in INDEX_FIELDS:
            if k in arrays:
                arrays[k] = table.lookup(old.id_of(arrays[k])) if old is not None else np.zeros_like(arrays[k])

    def _scatter(self, users: Sequence[str], st: dict[str, torch.Tensor], sv: Serving) -> dict[str, bytes]:
        host = {k: v.cpu().numpy() for k, v in st.items()}  # one copy per field for the whole batch
        meta = {"items": items_key(sv.table)}
        return {u: encode({k: v[b] for k, v in host.items()}, meta) for b, u in enumerate(users)}

    # ------------------------------------------------------------------ the batch
    def process(self, events, states):
        self.maybe_reload()
        sv = self.serving
        users, seqs, unknown = self._sequences(events, sv.table)
        st = self._gather(users, states, sv)
        before = st["session"].clone()
        ev = EventBatch.from_sequences(*seqs).to(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            st, u = sv.model.step(st, ev)
        t1 = time.perf_counter()
        items, scores = sv.retriever.candidates(sv.model, st, u)
        t2 = time.perf_counter()
        event_ts = np.fromiter((int(s[2][-1]) for s in zip(*seqs, strict=True)), np.int64, len(users))
        outputs = list(build_messages(users, u, st, items, scores, sv.table, event_ts, sv.tag,
                                      emitted_at=int(time.time() * 1000)))
        new_states = self._scatter(users, st, sv)
        extra = {
            "unknown_item": unknown,
            "sessions_started": int((st["session"] - before).sum()),
            "model_step_seconds": t1 - t0,
            "topk_seconds": t2 - t1,
        }
        return new_states, outputs, extra

    @staticmethod
    def _sequences(events, table: ItemTable):
        """Group the batch by user (arrival order kept) into per-user numpy sequences."""
        n = len(events)
        user = np.array([e.user_id for e in events], dtype=object)
        item_idx = table.lookup(np.array([e.item_id for e in events], dtype=object))
        etype = event_type_index([e.event_type for e in events])
        ts = np.fromiter((e.ts for e in events), np.int64, n)
        users, first, inverse = np.unique(user, return_index=True, return_inverse=True)
        order = np.argsort(first)  # users in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        by_user = np.argsort(rank[inverse], kind="stable")
        cuts = np.cumsum(np.bincount(rank[inverse], minlength=len(order)))[:-1]
        groups = np.split(by_user, cuts)
        seqs = ([item_idx[g] for g in groups], [etype[g] for g in groups], [ts[g] for g in groups])
        return [str(x) for x in users[order]], seqs, int((item_idx == 0).sum())


def make_processor(settings: Settings) -> ModelProcessor:
    return ModelProcessor(settings)

