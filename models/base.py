"""The one interface every model shares: offline `forward`, streaming `init_state`/`step`, `scores`.

Shapes: B users, T events per user (left-aligned, `mask` marks real ones), D item dim, N catalogue
size. Item index 0 is "unknown item": its vector is all zeros, it still advances the session clock.

A model's streaming state is a dict of batched tensors. The part every model shares is kept here:

    last_ts   (B,)   int64  last applied event time in ms, -1 before the first event
    n_events  (B,)   int64  events applied so far (the recency clock of the recent-items memory)
    session   (B,)   int64  session counter (0 for the first session)
    sess_len  (B,)   int64  events in the current session
    mem_*     (B, M)        recent-items memory for the repeat path (models/repeat.py)

and each model adds its own fixed-size tensors (`model_state_spec`). The whole state is what
state/record.py stores per user, so every tensor here has a fixed shape.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livemb.core.choices import REPEAT_MODES
from livemb.core.errors import DataError
from livemb.models import repeat

EVENT_TYPES: tuple[str, ...] = ("click", "view", "cart", "purchase", "other")
_EVENT_TYPE_INDEX = {name: i for i, name in enumerate(EVENT_TYPES)}
# common aliases in public logs (Taobao's pv is a page view; favourites/likes stay `other`)
_EVENT_TYPE_INDEX.update({"buy": 3, "transaction": 3, "addtocart": 2, "add_to_cart": 2,
                          "pv": 1, "page_view": 1, "pageview": 1, "detail": 1})


def event_type_index(names: np.ndarray | list[str]) -> np.ndarray:
    """Map event-type strings to indices; anything unknown is `other`."""
    other = _EVENT_TYPE_INDEX["other"]
    return np.fromiter((_EVENT_TYPE_INDEX.get(str(n).lower(), other) for n in names), np.int64, len(names))


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters; checkpoints carry this and refuse to load into a different one.

    Fields are grouped by the models that read them (every model reads "shared")."""

    # -- shared (every model) ------------------------------------------------------------
    name: str = "hiertcn"
    dim: int = 64  # D, item-vector size (set from the item table)
    etype_dim: int = 8  # event-type embedding size
    session_gap_ms: int = 1_800_000
    # -- repeat path (models/repeat.py) ---------------------------------------------------
    recent_items: int = 64  # M, slots in the recent-items memory (64 x 24 bytes; docs/MODELS.md)
    repeat: str = "mixture"  # "mixture" (learned), "rule" (fixed recent-first) or "none"
    # -- recurrent state: hiertcn, hiergru, hgru (long-term GRU), gru, hrnn ---------------
    hidden: int = 128  # H
    # -- in-session encoder: hiertcn, tcn (TCN channels), hiergru, hgru (in-session GRU) --
    channels: int = 64
    # -- TCN: hiertcn, tcn ----------------------------------------------------------------
    kernel: int = 2
    dilations: tuple[int, ...] = (1, 2, 4)
    # -- hierarchy: hiertcn, hiergru --------------------------------------------------------
    agg: str = "items"  # session aggregate: "items" (mean item vector) or "outputs"
    # -- hrnn -----------------------------------------------------------------------------
    dt_buckets: int = 16  # log2 time-delta levels
    # -- item categories: the slot scorer reads "same category as the latest item" (set when the item
    # table has categories; a checkpoint from before the field reads none) ------------------
    item_categories: bool = False
    # ... and the slot's category among the user's other memory items (repeat.category_counts;
    # set with item_categories; a checkpoint from before the field reads False and keeps its features)
    category_context: bool = False
    version: str = "2"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"checkpoint config has unknown fields {sorted(unknown)}")
        d = dict(d)
        if "dilations" in d:
            d["dilations"] = tuple(d["dilations"])
        return cls(**d)

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel - 1) * sum(self.dilations)


@dataclass
class EventBatch:
    """Padded per-user event sequences, left-aligned: row b holds mask[b].sum() real events."""

    item: Tensor  # (B, T) int64, 0 = unknown item
    etype: Tensor  # (B, T) int64
    ts: Tensor  # (B, T) int64 ms
    mask: Tensor  # (B, T) bool

    def to(self, device: torch.device | str) -> EventBatch:
        return EventBatch(*(t.to(device) for t in (self.item, self.etype, self.ts, self.mask)))

    def slice(self, t0: int, t1: int) -> EventBatch:
        return EventBatch(self.item[:, t0:t1], self.etype[:, t0:t1], self.ts[:, t0:t1], self.mask[:, t0:t1])

    @staticmethod
    def from_sequences(items: list[np.ndarray], etypes: list[np.ndarray], ts: list[np.ndarray]) -> EventBatch:
        """Pad ragged per-user numpy sequences into one batch (one allocation per field)."""
        B = len(items)
        lengths = np.fromiter((len(x) for x in items), np.int64, B)
        T = max(int(lengths.max()) if B else 0, 1)
        mask = np.arange(T)[None, :] < lengths[:, None]
        out = []
        for seqs in (items, etypes, ts):
            arr = np.zeros((B, T), np.int64)
            if B and lengths.sum():
                arr[mask] = np.concatenate(seqs)
            out.append(torch.from_numpy(arr))
        return EventBatch(out[0], out[1], out[2], torch.from_numpy(mask))


def opens_session(ts: Tensor, clock: Tensor, gap_ms: int) -> Tensor:
    """THE session-break rule: an event at `ts` opens a session when the user has no event yet
    (clock < 0) or ts is more than gap_ms after the session clock (the latest ts seen so far)."""
    return (clock < 0) | (ts - clock > gap_ms)


def session_flags(ts: Tensor, mask: Tensor, last_ts: Tensor, gap_ms: int, dt_buckets: int) -> tuple[Tensor, Tensor]:
    """New-session flags and log2 time-delta levels for a padded batch, given each user's last_ts.

    Returns new_session (B, T) bool and dt_level (B, T) int64 where level 0 means "first event
    ever" and levels 1.. are 1 + floor(log2(1 + gap seconds)), clamped. Shared by the offline
    forward and the streaming step so both see identical breaks.
    """
    # the session clock is the latest time seen so far: a late event never moves it back
    prev = torch.cat([last_ts[:, None], ts[:, :-1]], dim=1).cummax(dim=1).values  # (B, T)
    first = prev < 0
    new_session = opens_session(ts, prev, gap_ms) & mask
    seconds = (ts - prev).clamp(min=0).to(torch.float64) / 1000.0
    level = 1 + torch.floor(torch.log2(1.0 + seconds)).to(torch.int64)
    level = level.clamp(max=dt_buckets - 1)
    level = torch.where(first, torch.zeros_like(level), level)
    return new_session, level


@dataclass
class SeqOut:
    """What the offline forward returns, per position (B, T, ...)."""

    u: Tensor  # (B, T, D) embedding after each event
    starts: Tensor | None = None  # (B, T, D) session-start embedding (models with next_session_embedding)
    gate: Tensor | None = None  # (B, T, G) the long-term state the repeat gate reads (== gate_state(st))


class SeqModel(nn.Module):
    """Base of every model. Subclasses set `name` and implement the hooks below.

    Neural subclasses implement `model_state_spec`, `init_model_state`, `cell` (one event for B
    users) and `forward_seq` (the whole padded sequence at once, the fast offline path). The base
    class runs the shared bookkeeping (sessions, recent-items memory) around them, so parity
    between `step` and `forward` only depends on `cell` agreeing with `forward_seq`.
    """

    name = "base"
    trainable = True  # False: nothing to learn beyond counting (fit() may still count)
    embeds = True  # True: produces a user vector in item space (served by the live worker)
    gate_field: str | None = None  # state tensor the repeat gate reads (the long-term state)

    def __init__(self, cfg: ModelConfig, item_vectors: Tensor | np.ndarray):
        super().__init__()
        if cfg.repeat not in REPEAT_MODES:
            raise ValueError(f"repeat must be one of {REPEAT_MODES}, got {cfg.repeat!r}")
        self.cfg = cfg
        vecs = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))
        if vecs.ndim != 2 or vecs.shape[1] != cfg.dim:
            raise ValueError(f"item vectors must be (N+1, {cfg.dim}), got {tuple(vecs.shape)}")
        # fixed inputs, not parameters; not saved in checkpoints (they carry a fingerprint instead)
        self.register_buffer("item_vecs", vecs, persistent=False)
        # (N+1,) category code per item (0 = none), fixed inputs like the vectors (set_item_categories)
        self.register_buffer("item_cats", torch.zeros(vecs.shape[0], dtype=torch.long), persistent=False)
        self.etype_emb = nn.Embedding(len(EVENT_TYPES), cfg.etype_dim)
        self.served = repeat.Variant()  # the served repeat path and mask (checkpoints carry the chosen one)
        self.rule = repeat.DEFAULT_RULE  # the rule's order inside the memory (checkpoints carry the chosen one)
        # added to the mixture gate's logit when scoring in eval mode (training learns the raw gate):
        # chosen on the held-out tail (TrainConfig.calibrate_gate), checkpoints carry it
        self.gate_shift = 0.0
        self.repeat_head = None
        if self.repeat_mode == "mixture":
            self.repeat_head = repeat.MixtureHead(len(EVENT_TYPES), cfg.dim, self.gate_dim(),
                                                  categories=cfg.item_categories, context=cfg.category_context)

    def set_item_categories(self, codes: np.ndarray | None) -> None:
        """The item table's category codes (ItemTable.category_codes: (N+1,), 0 = none). A model
        configured to read categories refuses a table without them (it would serve a feature it
        never sees); one that does not read them ignores them."""
        if not self.cfg.item_categories:
            return
        if codes is None:
            raise ValueError("this model reads item categories, but the item table has none "
                             "(pass the items.npz it was trained with)")
        codes = torch.tensor(np.asarray(codes, dtype=np.int64), device=self.item_cats.device)  # a copy: tables are read-only
        if codes.shape != self.item_cats.shape:
            raise ValueError(f"item categories must be one per item row {tuple(self.item_cats.shape)}, "
                             f"got {tuple(codes.shape)}")
        self.item_cats = codes

    def slot_categories(self, mem_item: Tensor) -> Tensor | None:
        """(B, M) category codes of the memory's items for the slot scorer; None when the model reads none."""
        return self.item_cats[mem_item.long()] if self.cfg.item_categories else None

    def slot_features(self, state: dict[str, Tensor], pool: bool = False) -> Tensor:
        """(B, M, F) the slot scorer's features of the memory in `state` (repeat.memory_features with
        this model's categories). `pool`: `state` is the open catalogue's pool of new items, which
        have no category (code 0) but the same feature columns."""
        if pool:  # the pool holds new-item keys, not item rows: nothing to look up
            cats = torch.zeros_like(state["mem_item"], dtype=torch.long) if self.cfg.item_categories else None
        else:
            cats = self.slot_categories(state["mem_item"])
        return repeat.memory_features(state, len(EVENT_TYPES), cats, self.cfg.category_context)

    def slot_category_counts(self, state: dict[str, Tensor]) -> Tensor | None:
        """(B, M, 3) repeat.category_counts of the memory in `state` for a model that reads the
        category context, else None: what a replay (models/replay.MemoryCache) computes once."""
        if not (self.cfg.item_categories and self.cfg.category_context):
            return None
        return repeat.slot_category_counts(state, self.slot_categories(state["mem_item"]))

    def rule_bonus(self, state: dict[str, Tensor]) -> Tensor:
        """(B, M) the rule's bonus of the memory's items: `self.rule`, with its category term when
        the model reads categories (a pool of new items has none: repeat.heuristic_bonus alone)."""
        return repeat.heuristic_bonus(state, self.rule, self.slot_categories(state["mem_item"]))

    @property
    def repeat_mode(self) -> str:
        """The configured repeat path; models that learn nothing use the fixed rule for "mixture"."""
        if self.cfg.repeat == "mixture" and not self.trainable:
            return "rule"
        return self.cfg.repeat

    @property
    def served_mode(self) -> str:
        """The repeat mode the served variant scores with (the live worker's and `embed`'s)."""
        return self.served.mode(self.repeat_mode)

    def gate_dim(self) -> int:
        """Size of the gate's long-term state: every gate_field is an H-sized recurrent state."""
        return 0 if self.gate_field is None else self.cfg.hidden

    def gate_state(self, st: dict[str, Tensor]) -> Tensor | None:
        """(B, G) long-term state for the repeat gate, read from the streaming state."""
        return None if self.gate_field is None else st[self.gate_field]

    # ------------------------------------------------------------------ hooks for subclasses
    def model_state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {}

    def init_model_state(self, B: int, device: torch.device) -> dict[str, Tensor]:
        return {k: torch.zeros((B, *shape), dtype=dt, device=device) for k, (shape, dt) in self.model_state_spec().items()}

    def cell(
        self, st: dict[str, Tensor], inp: Tensor, item: Tensor, etype: Tensor, new_session: Tensor, level: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Apply one event to B users. inp (B, D+E) = [item vector, event-type embedding].

        `st` is the state before the event (common fields included); return the model's own
        updated tensors and u (B, D)."""
        raise NotImplementedError

    def forward_seq(self, inp: Tensor, item: Tensor, new_session: Tensor, level: Tensor, mask: Tensor) -> SeqOut:
        """Offline: (B, T, D+E) inputs of whole sequences -> SeqOut (embeddings after each event, ...)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery
    @property
    def device(self) -> torch.device:
        return self.item_vecs.device

    @property
    def n_items(self) -> int:
        return self.item_vecs.shape[0] - 1

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        M = self.cfg.recent_items
        spec = {
            "last_ts": ((), torch.int64),
            "n_events": ((), torch.int64),
            "session": ((), torch.int64),
            "sess_len": ((), torch.int64),
        }
        spec.update(repeat.memory_spec(M))
        spec.update(self.model_state_spec())
        return spec

    def init_state(self, B: int) -> dict[str, Tensor]:
        dev = self.device
        st = {
            "last_ts": torch.full((B,), -1, dtype=torch.int64, device=dev),
            "n_events": torch.zeros(B, dtype=torch.int64, device=dev),
            "session": torch.full((B,), -1, dtype=torch.int64, device=dev),
            "sess_len": torch.zeros(B, dtype=torch.int64, device=dev),
        }
        st.update(repeat.init_memory(B, self.cfg.recent_items, dev))
        st.update(self.init_model_state(B, dev))
        return st

    def inputs(self, item: Tensor, etype: Tensor) -> Tensor:
        return torch.cat([self.item_vecs[item], self.etype_emb(etype)], dim=-1)

    def step(self, state: dict[str, Tensor], ev: EventBatch, return_all: bool = False):
        """Streaming: apply each user's new events (one or more) in order.

        Returns (new_state, u) with u (B, D) the embedding after each user's last new event
        (users with no event in `ev` keep their state; their u is the zero vector), or u (B, T, D)
        for every event when return_all. Loops over T (events per user), never over users.
        """
        B, T = ev.item.shape
        new_session, level = session_flags(ev.ts, ev.mask, state["last_ts"], self.cfg.session_gap_ms, self.cfg.dt_buckets)
        inp = self.inputs(ev.item, ev.etype)  # (B, T, D+E), one gather for the whole batch
        if T > 1 and not return_all and not torch.is_grad_enabled():  # inference: the rows are written in place
            active = _active_prefixes(ev.mask)  # users with different event counts: step those with an event at t
            if active is not None:
                return self._step_ragged(state, ev, inp, new_session, level, *active)
        st = dict(state)
        u_last = torch.zeros(B, self.cfg.dim, device=self.device)
        outs = []
        for t in range(T):
            m = ev.mask[:, t]
            upd, u = self._event_update(st, inp[:, t], ev.item[:, t], ev.etype[:, t], ev.ts[:, t], new_session[:, t], level[:, t])
            if bool(m.all()):  # every user has an event at t (a live batch: one click each): no merge
                st = {k: upd.get(k, v) for k, v in st.items()}
                u_last = u
            else:
                st = {k: (torch.where(_expand(m, v), upd[k], v) if k in upd else v) for k, v in st.items()}
                u_last = torch.where(m[:, None], u, u_last)
            if return_all:
                outs.append(u)
        if return_all:
            return st, torch.stack(outs, dim=1)
        return st, u_last

    def _event_update(self, st: dict[str, Tensor], inp: Tensor, item: Tensor, etype: Tensor, ts: Tensor,
                      ns: Tensor, level: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """One event for each of the B rows of `st`: the updated state fields and u (B, D)."""
        common = {
            "session": st["session"] + ns.long(),
            "sess_len": torch.where(ns, torch.ones_like(st["sess_len"]), st["sess_len"] + 1),
            "last_ts": torch.maximum(st["last_ts"], ts),  # late events do not move the clock back
            "n_events": st["n_events"] + 1,
        }
        model_st, u = self.cell(st, inp, item, etype, ns, level)
        upd = {**model_st, **common}
        upd.update(repeat.update_memory(st, item, ts, etype, common["session"], st["n_events"]))
        return upd, u

    def _step_ragged(self, state: dict[str, Tensor], ev: EventBatch, inp: Tensor, new_session: Tensor,
                     level: Tensor, order: Tensor, active: list[int]) -> tuple[dict[str, Tensor], Tensor]:
        """`step` for users with different numbers of events (a backfill batch: a few users with
        many, most with one or two). Users in order of decreasing event count, so the users with an
        event at t are the first active[t] rows: each t steps only those rows and writes them back
        in place, where the general loop steps every row and merges every state field by mask.
        Each row's arithmetic is the same (every op is row-wise)."""
        B = ev.item.shape[0]
        st = {k: v.index_select(0, order) for k, v in state.items()}  # copies: written in place below
        inp, item, etype, ts, ns, lv = (x.index_select(0, order) for x in (inp, ev.item, ev.etype, ev.ts, new_session, level))
        u_last = torch.zeros(B, self.cfg.dim, device=self.device)
        for t, n in enumerate(active):
            sub = {k: v[:n] for k, v in st.items()}
            upd, u = self._event_update(sub, inp[:n, t], item[:n, t], etype[:n, t], ts[:n, t], ns[:n, t], lv[:n, t])
            for k, v in upd.items():
                if k in st:
                    st[k][:n] = v
            u_last[:n] = u
        inv = torch.empty_like(order)
        inv[order] = torch.arange(B, device=order.device)
        return {k: v.index_select(0, inv) for k, v in st.items()}, u_last.index_select(0, inv)

    def next_session_embedding(self, st: dict[str, Tensor]) -> Tensor | None:
        """Embedding to use when the next event opens a new session; None: same as the current one."""
        return None

    def forward_full(self, ev: EventBatch) -> SeqOut:
        """Offline pass over fresh users' whole sequences: u, session-start embeddings, gate states."""
        B = ev.item.shape[0]
        last_ts = torch.full((B,), -1, dtype=torch.int64, device=ev.ts.device)
        new_session, level = session_flags(ev.ts, ev.mask, last_ts, self.cfg.session_gap_ms, self.cfg.dt_buckets)
        return self.forward_seq(self.inputs(ev.item, ev.etype), ev.item, new_session, level, ev.mask)

    def forward(self, ev: EventBatch) -> Tensor:
        """Offline: embeddings after every event of fresh users, (B, T, D)."""
        return self.forward_full(ev).u

    # ------------------------------------------------------------------ scoring
    def explore_scores(self, u: Tensor) -> Tensor:
        """(B, D) -> (B, N+1) inner products with every item; column 0 (unknown) is -inf."""
        s = u @ self.item_vecs.T
        s[:, 0] = -math.inf
        return s

    @staticmethod
    def log_partition(explore: Tensor) -> Tensor:
        """THE mixture's log Z: log-sum-exp of the explore scores (B, N+1) over the catalogue (B,)."""
        return torch.logsumexp(explore[:, 1:], dim=1)

    # evaluation hooks: a model may keep a running cache over the applied events (MaxItem's running
    # max) that `scores(..., running=)` reads instead of recomputing from the state; None: no cache
    def init_running(self, state: dict[str, Tensor]) -> Tensor | None:
        return None

    def update_running(self, run: Tensor, item: Tensor) -> None:
        """Fold the applied events' items (B,) into the cache in place."""

    def memory_scores(self, state: dict[str, Tensor], u: Tensor, mode: str | None = None, logz: Tensor | None = None,
                      gate_state: Tensor | None = None, explore_all: Tensor | None = None,
                      explore_mem: Tensor | None = None, novec: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """THE explore+repeat score, split for a merge with any explore retrieval (full catalogue or faiss):

        returns shift (B,) and mem (B, M): an item outside the memory scores <u, x_i> + shift, the
        item of memory slot m scores mem[:, m] (-inf for empty slots). `logz` (B,) is the
        log-sum-exp of the explore scores over the catalogue (computed when None and needed);
        `gate_state` defaults to `gate_state(state)` (training passes the offline one);
        `explore_all` (B, N+1), when the caller has the catalogue's explore scores, or
        `explore_mem` (B, M), the slots' own explore scores <u, x_m> (training computes them per
        chunk, models/train.slot_explore), saves the (B, M, D) gather of the memory's vectors.
        `novec`: S more slots of items without a vector (the open catalogue's new items,
        models/newitems.as_memory): they join the repeat softmax by their behaviour features, have no
        explore term, and their scores follow the memory's, mem (B, M + S).
        """
        mode = self.repeat_mode if mode is None else mode
        mem_item = state["mem_item"].long()
        filled = mem_item > 0
        if explore_mem is not None:
            explore = explore_mem.masked_fill(~filled, 0.0)
        elif explore_all is None:
            explore = (self.item_vecs[mem_item] * u[:, None, :]).sum(-1)  # (B, M)
        else:
            explore = explore_all.gather(1, mem_item).masked_fill(~filled, 0.0)
        shift = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        M = filled.shape[1]
        nv_filled = None if novec is None else novec["mem_item"] > 0
        extra = None  # (B, S) scores of the novec slots
        if mode == "none":
            mem = explore
            if novec is not None:  # no repeat path: nothing can rank an item without a vector
                extra = torch.full(nv_filled.shape, -math.inf, dtype=mem.dtype, device=mem.device)
        elif mode == "rule" or self.repeat_head is None:
            mem = explore + self.rule_bonus(state)
            if novec is not None:
                extra = repeat.heuristic_bonus(novec, self.rule).to(mem.dtype)
        else:
            if logz is None:
                logz = self.log_partition(self.explore_scores(u))
            feats = self.slot_features(state)
            all_filled = filled
            if novec is not None:
                feats = torch.cat([feats, self.slot_features(novec, pool=True)], dim=1)
                all_filled = torch.cat([filled, nv_filled], dim=1)
            gs = self.gate_state(state) if gate_state is None else gate_state
            rep_logp, a = self.repeat_head(feats, all_filled, u, gs)
            if self.gate_shift and not self.training:  # the gate's calibration on unseen data (docs/MODELS.md)
                a = a + self.gate_shift
            shift = F.logsigmoid(-a) - logz  # log(1 - g) - log Z
            rep = F.logsigmoid(a)[:, None] + rep_logp
            mem = torch.logaddexp(explore + shift[:, None], rep[:, :M])
            if novec is not None:
                extra = rep[:, M:]
        mem = mem.masked_fill(~filled, -math.inf)
        if extra is not None:
            mem = torch.cat([mem, extra.masked_fill(~nv_filled, -math.inf)], dim=1)
        return shift, mem

    def scores(self, state: dict[str, Tensor], u: Tensor, repeat_mode: str | None = None,
               explore: Tensor | None = None, running: Tensor | None = None) -> Tensor:
        """Full-catalogue scores (B, N+1) for ranking: explore path merged with the repeat path.
        `explore`: this model's repeat_mode="none" scores of the same users, if already computed;
        `running`: the cache of `init_running` (unused here)."""
        s = self.explore_scores(u) if explore is None else explore
        mode = self.repeat_mode if repeat_mode is None else repeat_mode
        if mode == "none":
            return s
        logz = self.log_partition(s) if mode == "mixture" else None
        shift, mem = self.memory_scores(state, u, mode, logz, explore_all=s)
        out = s + shift[:, None]
        out.scatter_(1, state["mem_item"].long(), mem)  # slots hold distinct items; empty slots hit column 0
        out[:, 0] = -math.inf
        return out


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _active_prefixes(mask: Tensor) -> tuple[Tensor, list[int]] | None:
    """For left-aligned rows (row b: its first n_b positions real): the rows in order of
    decreasing n_b (stable) and, per position t, how many of them have an event there (one host
    read per batch); None when some row has a gap."""
    T = mask.shape[1]
    lengths = mask.sum(dim=1)
    if not bool((mask == (torch.arange(T, device=mask.device)[None, :] < lengths[:, None])).all()):
        return None
    order = torch.argsort(lengths, descending=True, stable=True)
    active = (lengths[:, None] > torch.arange(T, device=mask.device)[None, :]).sum(dim=0).tolist()
    return order, [n for n in active if n > 0]


MODEL_REGISTRY: dict[str, type] = {}


def register(cls):
    MODEL_REGISTRY[cls.name] = cls
    return cls


__all__ = ["EVENT_TYPES", "EventBatch", "ModelConfig", "SeqModel", "SeqOut", "register", "MODEL_REGISTRY", "session_flags",
           "opens_session", "event_type_index"]
