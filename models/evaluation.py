"""The evaluation protocol of SPEC section 4, shared by `livemb evaluate` and the early-stopping
validation: one ranking of targets for every model and every served variant.

At test time each user's state is warmed on their train history through the streaming `step`,
then every test event is scored against the full catalogue BEFORE it is applied, exactly as the
live service would. One pass scores every variant: repeat path (the model's own = "rep", the fixed
recent-first rule = "rule", none = "norep") x exclude_seen (none/session/history).
Ties are pessimistic (models/metrics.ranks_of); targets without an item vector are skipped and
counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from livemb.core.errors import ConfigError
from livemb.core.progress import progress as progress_bar
from livemb.models import newitems, repeat
from livemb.models.base import EVENT_TYPES, MODEL_REGISTRY, EventBatch, ModelConfig, SeqModel, opens_session
from livemb.models.metrics import RankAccumulator, over_all_events, ranks_from_explore
from livemb.models.newvectors import Timeline
from livemb.models.replay import Sequence

REPEATS, EXCLUDES = repeat.REPEATS, repeat.EXCLUDES
VARIANTS = [(rep, excl) for rep in REPEATS for excl in EXCLUDES]
DEFAULT_VARIANT = repeat.Variant().name  # served when nothing was chosen from the data


def variant_name(rep: str, excl: str) -> str:
    return f"{rep}+{excl}"


def _take(st: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {key: v[:k] for key, v in st.items()}


def _put(st: dict[str, torch.Tensor], new: dict[str, torch.Tensor], k: int) -> None:
    for key, v in new.items():
        st[key][:k] = v


def warm_up(model: SeqModel, st: dict[str, torch.Tensor], seqs: list[Sequence],
            keys: list[np.ndarray] | None = None) -> tuple[dict, torch.Tensor]:
    """Step B users through their histories; per-step work is proportional to the users still
    active (rows are processed longest-first, so the active ones are a prefix). `keys`: each
    user's new-item keys (models/newitems.py) when `st` carries the open catalogue's pool."""
    B = len(seqs)
    u = torch.zeros(B, model.cfg.dim, device=model.device)
    lengths = np.fromiter((len(s[0]) for s in seqs), np.int64, B)
    if not lengths.sum():
        return st, u
    order = np.argsort(-lengths, kind="stable")
    perm = torch.from_numpy(order).to(model.device)
    st = {k: v[perm] for k, v in st.items()}
    ev = EventBatch.from_sequences(*zip(*(seqs[i] for i in order), strict=True)).to(model.device)
    active = np.searchsorted(-lengths[order], -np.arange(ev.item.shape[1]), side="left")  # users with len > t
    kp = None if keys is None else newitems.pad([keys[i] for i in order], ev.item.shape[1], model.device)
    u_sorted = torch.zeros_like(u)
    step = 32  # events per call: fewer Python round trips, still close to the active count
    for t0 in range(0, ev.item.shape[1], step):
        k = int(active[t0])
        sub = EventBatch(*(x[:k, t0 : t0 + step] for x in (ev.item, ev.etype, ev.ts, ev.mask)))
        new, u_k = model.step(_take(st, k), sub)
        if kp is not None:
            new.update(newitems.update_pool(model, _take(st, k), sub, kp[:k, t0 : t0 + step]))
        _put(st, new, k)
        u_sorted[:k] = torch.where(sub.mask.any(1)[:, None], u_k, u_sorted[:k])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(B, device=model.device)
    return {k: v[inv] for k, v in st.items()}, u_sorted[inv]


def repeat_parts(model: SeqModel, st: dict[str, Tensor], u: Tensor, base: Tensor, mode: str | None,
                 gate_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(shift (B,), slot scores (B, M), or (B, M + S) with the open catalogue's pool in `st`) of
    repeat mode `mode` (None: the model's own) on top of the
    explore scores `base` (B, N+1): what `model.scores(st, u, mode)` would put outside / inside the
    memory. The learned mixture goes through `memory_scores` (the serving definition); the rule
    and "none" are the explore score plus the fixed bonus / nothing, for every model.
    `gate_state`: the mixture gate's long-term state when `st` lacks it (the validation's replay)."""
    mode = model.repeat_mode if mode is None else mode
    mem_item = st["mem_item"].long()
    pool = newitems.as_memory(st)
    if mode == "mixture":
        return model.memory_scores(st, u, "mixture", model.log_partition(base), gate_state, explore_all=base, novec=pool)
    mem = base.gather(1, mem_item)
    if mode == "rule":
        mem = mem + model.rule_bonus(st).to(mem.dtype)
    mem = mem.masked_fill(mem_item <= 0, -math.inf)
    if pool is not None:  # the pool's items: the rule's bonus alone (no vector); no repeat path, no score
        extra = repeat.heuristic_bonus(pool, model.rule).to(mem.dtype) if mode == "rule" else torch.zeros_like(pool["mem_count"], dtype=mem.dtype)
        mem = torch.cat([mem, extra.masked_fill((pool["mem_item"] <= 0) | (mode == "none"), -math.inf)], dim=1)
    return torch.zeros(base.shape[0], dtype=base.dtype, device=base.device), mem


def variant_ranks(model: SeqModel, st: dict[str, Tensor], u: Tensor, base: Tensor, target: Tensor,
                  reps: tuple[str, ...] = REPEATS, gate_state: Tensor | None = None,
                  target_key: Tensor | None = None, ext: Tensor | None = None,
                  ext_target: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """THE ranking of targets, shared by `evaluate_model` and the early-stopping validation:
    {rep: {exclude_seen: ranks (B,)}} of each repeat variant in `reps` on top of the explore
    scores `base` (B, N+1), for every exclude_seen. Variants that are the same repeat mode (a
    counting model's own path is the rule) share one computation. With the open catalogue's pool
    in `st`, `target_key` (B,) is each target's new-item key (0 for a catalogue item); `ext` (B, E)
    the explore scores of the new-item extension (models/newvectors.py; -inf: no item) and
    `ext_target` (B, E) the target's column there: they take each variant's shift."""
    slots = {e: repeat.excluded_slots(st, e) for e in EXCLUDES if e != "none"}
    pool = newitems.as_memory(st)
    if pool is not None:
        slots = {e: torch.cat([ex, repeat.excluded_slots(pool, e)], 1) for e, ex in slots.items()}
    own = model.repeat_mode
    out: dict[str, dict[str, Tensor]] = {}
    done: dict[str, dict[str, Tensor]] = {}  # repeat mode -> ranks
    for rep in reps:
        mode = repeat.Variant(rep).mode(own)
        if mode not in done:
            shift, mem = repeat_parts(model, st, u, base, mode, gate_state)
            done[mode] = ranks_from_explore(base, target, st["mem_item"], shift, mem, slots,
                                            None if pool is None else pool["mem_item"], target_key,
                                            None if ext is None else ext + shift[:, None].to(ext.dtype), ext_target)
        out[rep] = done[mode]
    return out


class Tallies:
    """What `evaluate_model` accumulates: every variant's ranks, and the "rep+none"-style splits of
    each repeat path: targets that open a session, by the type of the event before them, and in or
    out of the memory (what a repeat path can reach vs explore only)."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.variants = {variant_name(r, e): RankAccumulator() for r, e in VARIANTS}
        self.session_start = RankAccumulator()  # where the cross-session state has to earn its keep
        self.after = {(rep, ty): RankAccumulator() for rep in REPEATS for ty in range(len(EVENT_TYPES))}
        self.by_mem = {(rep, hit): RankAccumulator() for rep in REPEATS for hit in (True, False)}
        self.skipped = 0  # targets without an item vector (with the open catalogue: and not in the pool)
        self.in_memory = 0  # scored targets already in the recent-items memory (or the pool)
        self.new_items = 0  # targets whose item is absent from the catalogue (a new item)
        self.new_in_pool = 0  # of those, the ones in the user's new-item pool (scored)
        self.new_in_index = 0  # of those, the ones outside the pool with a stream vector (scored by explore)
        self.via_index = {rep: RankAccumulator() for rep in REPEATS}  # their ranks ("rep+none" style)

    def add(self, ranks: dict[str, dict[str, Tensor]], prev_type: Tensor, hit: Tensor, opens: Tensor,
            in_index: Tensor | None = None) -> None:
        """ranks from `variant_ranks` for k scored targets; prev_type, hit, opens (k,); in_index
        (k,): the targets ranked through the new-item extension."""
        self.in_memory += int(hit.sum())
        if in_index is not None:
            self.new_in_index += int(in_index.sum())
            for rep in REPEATS:
                self.via_index[rep].add(ranks[rep]["none"][in_index])
        for rep in REPEATS:
            for excl in EXCLUDES:
                self.variants[variant_name(rep, excl)].add(ranks[rep][excl])
            for j in prev_type.unique().tolist():
                if j >= 0:
                    self.after[(rep, j)].add(ranks[rep]["none"][prev_type == j])
            self.by_mem[(rep, True)].add(ranks[rep]["none"][hit])
            self.by_mem[(rep, False)].add(ranks[rep]["none"][~hit])
        self.session_start.add(ranks["rep"]["none"][opens])

    def summary(self) -> dict:
        n = self.n_items
        out = {name: acc.summary(n) for name, acc in self.variants.items()}
        for summary in out.values():  # what a live deployment counts: an unknown item is a miss
            summary["all_events"] = over_all_events(summary, self.skipped)
        out["session_start"] = self.session_start.summary(n)
        out["by_memory"] = {variant_name(rep, "none"): {"in_memory": self.by_mem[(rep, True)].summary(n),
                                                         "not_in_memory": self.by_mem[(rep, False)].summary(n)}
                            for rep in REPEATS}
        out["after_event_type"] = {variant_name(rep, "none"): {EVENT_TYPES[ty]: self.after[(rep, ty)].summary(n)
                                                               for ty in range(len(EVENT_TYPES)) if self.after[(rep, ty)].n}
                                   for rep in REPEATS}
        out["targets_skipped_unknown_item"] = self.skipped
        out["targets_in_memory"] = self.in_memory
        out["targets_new_item"] = self.new_items
        out["targets_new_item_in_pool"] = self.new_in_pool
        out["targets_new_item_in_index"] = self.new_in_index
        out["via_index"] = {variant_name(rep, "none"): self.via_index[rep].summary(n) for rep in REPEATS}
        return out


@torch.no_grad()
def evaluate_model(
    model: SeqModel, train: dict[str, Sequence], test: dict[str, Sequence], batch_users: int = 256, progress: bool = True,
    group_types: tuple[dict[str, Sequence], dict[str, Sequence]] | None = None,
    open_keys: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
    new_vectors: Timeline | None = None,
) -> dict:
    """Score every test event of every test user; returns {variant: metrics} plus the splits of
    `Tallies` and the skip counts.

    `after_event_type` groups the targets by the type of the event before them, read from
    `group_types` (train, test) when given (the real types while the model sees none), else from
    train/test themselves.

    `open_keys` (train, test): each user's new-item keys (`models.newitems.key_sequences`): the
    states then carry the open catalogue's pool, advanced as the live worker advances it, and
    the same pass also ranks every target with it: the result gains "open_catalogue", the
    `Tallies` summary of that ranking (a new-item target in the user's pool is scored; the
    ranking without the pool is unchanged, the pool touches no other state).

    `new_vectors` (with `open_keys`): the new-item extension over time (models/newvectors.py):
    the result gains "open_catalogue_vectors", the ranking with the pool AND the extension's
    snapshot at each target's time (a new-item target outside the pool with a vector is scored
    by explore; the extension's items compete with every target).

    Users are batched by test length (longest first, as training buckets by length) and, inside a
    batch, the users still active at step t are a prefix: every per-step tensor op runs on those
    rows only, so the work is proportional to the events, not to batch x longest history.
    """
    model.eval()
    users = sorted(test, key=lambda x: (-len(test[x][0]), x))
    tallies = Tallies(model.n_items)
    opened = Tallies(model.n_items) if open_keys is not None else None
    vectored = Tallies(model.n_items) if open_keys is not None and new_vectors is not None else None
    gap = model.cfg.session_gap_ms
    empty = (np.zeros(0, np.int64),) * 3
    bar = progress_bar(total=sum(len(test[x][0]) for x in users), desc=f"eval {model.name}", unit="ev",
                       disable=not progress, leave=False)
    for i in range(0, len(users), batch_users):
        group = users[i : i + batch_users]
        st = model.init_state(len(group))
        train_keys = None
        if open_keys is not None:
            st = newitems.with_pool(st)
            train_keys = [open_keys[0].get(g, np.zeros(len(train.get(g, empty)[0]), np.int64)) for g in group]
        st, u = warm_up(model, st, [train.get(x, empty) for x in group], train_keys)
        run = model.init_running(st)  # a model's own evaluation cache (MaxItem's running max) or None
        g_train, g_test = group_types or (train, test)
        prev_type = torch.tensor([int(g_train[g][1][-1]) if g in g_train and len(g_train[g][1]) else -1 for g in group],
                                 dtype=torch.int64, device=model.device)  # (B,) type of the last applied event
        ev = EventBatch.from_sequences(*zip(*(test[g] for g in group), strict=True)).to(model.device)
        ev_type = ev.etype if group_types is None else \
            EventBatch.from_sequences(*zip(*(g_test[g] for g in group), strict=True)).etype.to(model.device)
        keys = None if open_keys is None else newitems.pad([open_keys[1][g] for g in group], ev.item.shape[1], model.device)
        n_active = ev.mask.sum(0).tolist()  # users sorted by test length: the active ones are a prefix
        for t in range(ev.item.shape[1]):
            k = n_active[t]
            sk = _take(st, k)
            target = ev.item[:k, t]
            scored = target > 0
            tallies.skipped += int((~scored).sum())
            if keys is not None:
                tkey = keys[:k, t]
                in_pool = ((sk["new_key"] == tkey[:, None]) & (tkey > 0)[:, None]).any(1)
                scored_open = scored | in_pool
                opened.skipped += int((~scored_open).sum())
                opened.new_items += int((tkey > 0).sum())
                opened.new_in_pool += int(in_pool.sum())
            if vectored is not None:
                ext_items, ext_snap = _extension(new_vectors, ev.ts[:k, t], sk["new_key"])
                ext_target = (ext_items == tkey[:, None]) & (tkey > 0)[:, None] & ~in_pool[:, None]
                scored_vec = scored_open | ext_target.any(1)
                vectored.skipped += int((~scored_vec).sum())
                vectored.new_items += int((tkey > 0).sum())
                vectored.new_in_pool += int(in_pool.sum())
            if scored.any() or (keys is not None and scored_open.any()) or (vectored is not None and scored_vec.any()):
                opens = opens_session(ev.ts[:k, t], sk["last_ts"], gap)
                u_next = model.next_session_embedding(sk)
                # the serving side knows the request time, so a returning user gets the start embedding
                u_eval = u[:k] if u_next is None else torch.where(opens[:, None], u_next, u[:k])
                # every variant differs from the explore scores only by a per-row shift and the
                # (k, M) slots: one (k, N) comparison of the shared explore scores per variant, no
                # merged (k, N+1) matrix (models.metrics.ranks_from_explore)
                base = model.scores(sk, u_eval, "none", running=None if run is None else run[:k])
                ptype, first = prev_type[:k], (opens & (sk["last_ts"] >= 0))
                closed = newitems.drop_pool(sk)
                rows = [(tallies, scored, closed, None, None)]
                if keys is not None:
                    rows.append((opened, scored_open, sk, tkey, None))
                if vectored is not None:
                    ext = _extension_scores(new_vectors, ext_snap, u_eval).masked_fill(ext_items == 0, -math.inf)
                    rows.append((vectored, scored_vec, sk, tkey, (ext, ext_target)))
                for tally, sel, sk_t, tk, ex in rows:
                    if not sel.any():
                        continue
                    b, s_t, u_t = base, sk_t, u_eval
                    if not bool(sel.all()):  # (k, N+1) copy only when some target is not scored
                        b, s_t, u_t = base[sel], {key: v[sel] for key, v in sk_t.items()}, u_eval[sel]
                    tk_s = None if tk is None else tk[sel]
                    hit = (s_t["mem_item"] == target[sel, None]).any(1)
                    if tk_s is not None:
                        hit |= ((s_t["new_key"] == tk_s[:, None]) & (tk_s > 0)[:, None]).any(1)
                    e_s, et_s = (None, None) if ex is None else (ex[0][sel], ex[1][sel])
                    tally.add(variant_ranks(model, s_t, u_t, b, target[sel], target_key=tk_s, ext=e_s, ext_target=et_s),
                              ptype[sel], hit=hit, opens=first[sel], in_index=None if et_s is None else et_s.any(1))
            step_ev = EventBatch(*(x[:k, t : t + 1] for x in (ev.item, ev.etype, ev.ts, ev.mask)))
            new, u_new = model.step(sk, step_ev)
            if keys is not None:
                new.update(newitems.update_pool(model, sk, step_ev, keys[:k, t : t + 1]))
            _put(st, new, k)
            u[:k] = u_new
            prev_type[:k] = ev_type[:k, t]
            if run is not None:
                model.update_running(run[:k], ev.item[:k, t])
            bar.update(k)
    bar.close()
    out = tallies.summary()
    if opened is not None:
        out["open_catalogue"] = opened.summary()
    if vectored is not None:
        out["open_catalogue_vectors"] = vectored.summary()
    return out


def _extension(timeline: Timeline, ts: Tensor, pool_key: Tensor) -> tuple[Tensor, np.ndarray]:
    """The new-item extension each of k users sees at its target's time: (keys (k, E) int64, 0 =
    padding and the users' own pool items, which the pool scores; the snapshot index per user)."""
    snap = timeline.at(ts.cpu().numpy())
    parts = {int(i): timeline.snapshot(int(i))[0] for i in np.unique(snap)}
    keys = np.zeros((len(snap), max(len(p) for p in parts.values())), np.int64)
    for i, ks in parts.items():
        keys[np.flatnonzero(snap == i), : len(ks)] = ks
    keys_t = torch.from_numpy(keys).to(pool_key.device)
    return keys_t.masked_fill((keys_t[:, :, None] == pool_key[:, None, :]).any(2), 0), snap


def _extension_scores(timeline: Timeline, snap: np.ndarray, u: Tensor) -> Tensor:
    """(k, E) explore scores <u, v> of each user's snapshot (columns as `_extension`'s keys)."""
    E = max([len(timeline.snapshot(int(i))[0]) for i in np.unique(snap)])
    out = torch.zeros(len(snap), E, device=u.device)
    for i in np.unique(snap):
        vecs = torch.from_numpy(timeline.snapshot(int(i))[1]).to(u.device)
        rows = torch.from_numpy(np.flatnonzero(snap == i)).to(u.device)
        out[rows, : vecs.shape[0]] = u[rows].float() @ vecs.T
    return out


def build_model(name: str, vectors: np.ndarray, categories: np.ndarray | None = None, **cfg_overrides) -> SeqModel:
    """A fresh model over `vectors` (N+1, D); `categories` (N+1,) codes (ItemTable.category_codes):
    the model reads them (ModelConfig.item_categories) when given."""
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(MODEL_REGISTRY)}")
    has = categories is not None
    cfg = ModelConfig(**{"name": name, "dim": vectors.shape[1], "item_categories": has, "category_context": has,
                         **cfg_overrides})
    model = MODEL_REGISTRY[name](cfg, vectors)
    model.set_item_categories(categories)
    return model
