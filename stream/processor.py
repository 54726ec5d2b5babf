"""The live micro-batch step around the model: ONE model step and ONE faiss search for the batch.

Called by the batch step (stream/batch.py, step 5) with the batch's applied events (arrival order) and the
users' stored state blobs. Everything here is batched: item lookups are one vectorized call for the
batch, the stored rows become (B, ...) tensors and back through the `StateCodec` (state/codec.py,
which also remaps item indices written under an older item table), the model advances every user at
once (loops over events-per-user only), and there is one device->host copy of the results.

Hot swap: `FileWatch` (stream/reload.py) says when the checkpoint or the items file changed; the new
model/index are built aside here and swapped in one assignment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from livemb.core.errors import ConfigError
from livemb.core.events import ValidEvent
from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models import newitems, newvectors
from livemb.models.base import EventBatch, event_type_index
from livemb.models.grouping import group_by_user
from livemb.models.newvectors import Evidence, Extension
from livemb.models.serving import Serving, build_messages
from livemb.state.codec import REC_FIELD, StateCodec
from livemb.stream import evidence
from livemb.stream.ports import ModelInfo, StepResult
from livemb.stream.quality import open_targets, put_rec, score_events, split_rec, with_rec
from livemb.stream.reload import FileWatch

log = logging.getLogger("livemb.processor")
OPTIONAL = (REC_FIELD, *newitems.POOL_FIELDS)  # fields a stored row may lack (written before they existed)


class ModelProcessor:
    """BatchProcessor (stream/ports.py) around a served model; hot swap between batches."""

    def __init__(self, settings: Settings, reload_check_s: float | None = None):
        if not settings.model_path or not settings.items_path:
            raise ConfigError("the worker needs --model CKPT and --items ITEMS")
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.device = torch.device(settings.resolved_device())
        check_s = settings.reload_check_s if reload_check_s is None else reload_check_s
        self.watch = FileWatch((settings.model_path, settings.items_path), check_s)
        self.codec = StateCodec()
        self.serving = self._load(stale_index="refuse")
        self._reset_extension()

    @property
    def ready(self) -> bool:
        return True  # the constructor raises unless a model is loaded

    # ------------------------------------------------------------------ loading / hot swap
    def _load(self, stale_index: str = "rebuild") -> Serving:
        s = self.settings
        sv = Serving.load(s.model_path, s.items_path, index=s.index, topk=s.topk, exclude_seen=s.exclude_seen, repeat_path=s.repeat_path,
                          device=str(self.device), allow_new_items=True,
                          index_path=s.index_path, stale_index=stale_index)
        self.codec.add_table(sv.table)
        log.info("serving %s (%s; rule %s; gate shift %g) on %s, items %s (%d x %d), index %s", sv.tag,
                 sv.model.served.name, sv.model.rule.name, sv.model.gate_shift, self.device,
                 sv.table.fingerprint, len(sv.table), sv.table.dim, s.index)
        return sv

    @property
    def reload_counts(self) -> dict[str, int]:
        return self.watch.counts

    def request_reload(self) -> None:
        """SIGHUP: the next `maybe_reload` (the worker's 0.25 s timer or the next batch) checks at once."""
        self.watch.request()

    def maybe_reload(self) -> bool:
        new = self.watch.poll(self._load, self.serving.tag)
        if new is None:
            return False
        table_changed = new.table.fingerprint != self.serving.table.fingerprint
        self.serving = new  # a batch sees either the old or the new set
        if table_changed:  # the evidence sums are in the old table's vector space: start over
            self._reset_extension()
        return True

    def _reset_extension(self) -> None:
        """The new-item explore extension (models/newvectors.py), when the open catalogue and
        `new_item_vectors` are on: this worker's evidence and the extension its batches search."""
        s = self.settings
        on = s.open_catalogue and s.new_item_vectors
        self.evidence = Evidence(self.serving.table.dim, s.new_item_cap, s.new_item_min_evidence) if on else None
        self.extension: Extension | None = Extension(self.evidence, self.device) if on else None
        self.generation = getattr(self, "generation", -1) + 1  # the evidence reader reads the topic again

    def model_info(self) -> ModelInfo:
        """For the livemb_model_info metric; changes on a hot swap."""
        name, _, version = self.serving.tag.partition("@")
        return ModelInfo(name, f"{version}/items:{self.serving.table.fingerprint}", str(self.device))

    # ------------------------------------------------------------------ the batch
    def process(self, events: list[ValidEvent], states: dict[str, bytes | None]) -> StepResult:
        self.maybe_reload()
        sv = self.serving
        stored = self.codec.decode({u: b for u, b in states.items() if b is not None}, self._fields(sv), sv.table,
                                   optional=OPTIONAL)
        rejected = stored.rejected
        if rejected:
            events = [e for e in events if e.user_id not in rejected]
        if not events:
            return StepResult(states={}, outputs=[], rejected=rejected)
        users, seqs, unknown, new_keys = self._sequences(events, sv.table, self.settings.open_catalogue)
        st, rec = split_rec(self._stack(stored, users, sv))
        tq = time.perf_counter()
        lengths = np.fromiter((len(x) for x in seqs[0]), np.int64, len(users))
        targets, mem = open_targets(np.concatenate(seqs[0]), st["mem_item"].cpu().numpy(), st, new_keys, lengths)
        quality = score_events(rec, mem, np.repeat(np.arange(len(users)), lengths), targets, np.concatenate(seqs[1]))
        quality_s = time.perf_counter() - tq
        before = st["session"].clone()
        t0 = time.perf_counter()
        ev = EventBatch.from_sequences(*seqs)
        st_before, (st, u) = st, sv.advance(st, ev)
        if new_keys is not None:  # the open catalogue: new item ids into the users' pools (models/newitems.py)
            st.update(newitems.update_pool(sv.model, st_before, ev.to(self.device), *new_keys))
        t1 = time.perf_counter()
        event_ts = np.fromiter((int(t[-1]) for t in seqs[2]), np.int64, len(users))
        ext = self.extension
        items, messages = sv.recommend(users, st, u, event_ts, emitted_at=int(time.time() * 1000), extension=ext)
        outputs = list(messages)
        t2 = time.perf_counter()
        states = self.codec.encode(users, put_rec(st, items, ext), sv.table)
        record = self._batch_evidence(sv, st_before, ev, new_keys) if self.evidence is not None else None
        return StepResult(
            states=states,
            outputs=outputs,
            rejected=rejected,
            unknown_items=unknown,
            sessions_started=int((st["session"] - before).sum()),
            model_step_seconds=t1 - t0,
            topk_seconds=t2 - t1,
            quality=quality,
            quality_seconds=quality_s,
            new_item_evidence=record,
        )

    def _batch_evidence(self, sv: Serving, before: dict[str, torch.Tensor],
                        ev: EventBatch, new_keys) -> bytes | None:
        """The batch's co-occurrence pairs (`newvectors.state_pairs`) as one record of the evidence
        topic (stream/evidence.py), by ids; None when there are none. Nothing is folded here: the
        worker folds what it reads back from the topic, as every other worker does."""
        if not newitems.has_pool(before):
            return None
        ev = ev.to(self.device)
        keys = new_keys[0] if new_keys is not None else torch.zeros_like(ev.item, dtype=torch.int64)
        cfg = sv.model.cfg
        _, key, item = newvectors.state_pairs(before, ev, keys, cfg.session_gap_ms, cfg.dt_buckets,
                                              self.settings.new_item_window)
        if not len(key):
            return None
        # each key's id: from the pools before the batch or the batch's own events (a pair's key is in one)
        raw_of: dict[int, bytes] = {}
        sources = [(before["new_key"], before[newitems.ID_FIELD])] + ([new_keys] if new_keys is not None else [])
        for k_t, r_t in sources:
            k = k_t.cpu().numpy().ravel()
            r = r_t.cpu().numpy().reshape(len(k), -1)
            raw_of.update((int(k[i]), bytes(r[i]).rstrip(b"\0")) for i in np.flatnonzero(k > 0))
        keep = [j for j, k in enumerate(key.tolist()) if k in raw_of]
        new_ids = [raw_of[int(key[j])].decode("utf-8", "replace") for j in keep]
        return evidence.encode(key[keep], new_ids, [str(x) for x in sv.table.id_of(item[keep])])

    @property
    def indexed(self) -> int:
        """New items in the explore extension (livemb_new_items_indexed)."""
        return 0 if self.extension is None else len(self.extension)

    def apply_evidence(self, *values: bytes) -> int:
        """Fold records of the evidence topic (stream/evidence.py), in the order given, and rebuild
        the extension the next batch searches once; returns the pairs folded (a pair whose known
        item this worker's item table lacks is skipped)."""
        if self.evidence is None:
            return 0
        folded = 0
        for value in values:
            keys, new_ids, known = evidence.decode(value)
            idx = self.serving.table.lookup(np.array(known, dtype=object)) if known else np.zeros(0, np.int64)
            ok = np.flatnonzero((idx > 0) & (keys > 0))
            if not len(ok):
                continue
            _, raw = newitems.keys_of([new_ids[j] for j in ok])
            vecs = self.serving.model.item_vecs[torch.from_numpy(idx[ok]).to(self.device)].cpu().numpy()
            self.evidence.add(keys[ok], vecs, raw)
            folded += len(ok)
        if folded:  # one rebuild per poll, not per record
            self.extension = newvectors.Extension(self.evidence, self.device)
        return folded

    def idle_messages(self, states: dict[str, bytes], last_ts: dict[str, int]) -> list[tuple[str, bytes]]:
        """The idle-session sweep (stream/sweep.py): for each user, a message whose embedding is the
        model's next-session embedding (the open session folded in). [] for models without sessions."""
        sv = self.serving
        stored = self.codec.decode(states, self._fields(sv), sv.table, optional=OPTIONAL)
        for user, why in stored.rejected.items():
            log.warning("idle sweep skips user %r: %s", user, why)
        users = [u for u in states if u not in stored.rejected]
        if not users:
            return []
        st, _ = split_rec(self._stack(stored, users, sv))
        with torch.no_grad():
            nxt = sv.model.next_session_embedding(st)
        if nxt is None:
            return []
        items, scores = sv.retriever.candidates(sv.model, st, nxt, self.extension)
        event_ts = np.array([last_ts[u] for u in users], np.int64)
        # marked, so a consumer keeping "the user's last in-session embedding" can tell them apart
        return list(build_messages(users, nxt, st, items, scores, sv.table, event_ts, sv.tag, int(time.time() * 1000),
                                   nxt, extra={"session_closed": True}, extension=self.extension))

    @staticmethod
    def _fields(sv: Serving) -> tuple[str, ...]:
        """A stored row's fields: the model's state + the last published list (stream/quality.py)
        + the open catalogue's pool (models/newitems.py; optional, dropped when it is off)."""
        return (*sv.model.state_spec(), *OPTIONAL)

    def _stack(self, stored, users: list[str], sv: Serving) -> dict[str, torch.Tensor]:
        st = self.codec.stack(stored, users, newitems.with_pool(with_rec(sv.model.init_state(len(users)), len(users))))
        return st if self.settings.open_catalogue else newitems.drop_pool(st)

    def _sequences(self, events: Sequence[ValidEvent], table: ItemTable, open_catalogue: bool = False):
        """Group the batch by user (arrival order kept) into per-user (items, etypes, ts) arrays;
        with the open catalogue also the (B, T) new-item keys and (B, T, ID_BYTES) raw ids."""
        n = len(events)
        ids = np.array([e.item_id for e in events], dtype=object)
        item_idx = table.lookup(ids)
        etype = event_type_index([e.event_type for e in events])
        ts = np.fromiter((e.ts for e in events), np.int64, n)
        users, groups = group_by_user(np.array([e.user_id for e in events], dtype=object))
        seqs = ([item_idx[g] for g in groups], [etype[g] for g in groups], [ts[g] for g in groups])
        new_keys = None
        if open_catalogue and (item_idx == 0).any():
            keys, raw = newitems.event_keys(ids, item_idx)
            T = max(len(g) for g in groups)
            new_keys = (newitems.pad([keys[g] for g in groups], T, self.device),
                        newitems.pad([raw[g] for g in groups], T, self.device))
        return [str(x) for x in users], seqs, int((item_idx == 0).sum()), new_keys
