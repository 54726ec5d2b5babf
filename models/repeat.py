"""The repeat path: a compact memory of each user's recent items and the ways to score it.

Real click logs are dominated by re-interactions, which an explore-only model (<u, x_item> over
the catalogue) ranks poorly. The memory keeps M slots per user (LRU by event clock, ties to the
lowest slot, so streaming and offline runs evict identically). Per slot, in compact dtypes so that
M = 64 fits the 4 KiB state budget (24 bytes a slot, docs/MODELS.md has the measurement):

    mem_item  int64  item index (0 = empty; int64 because the hot swap remaps it as int64)
    mem_count int16  touches since the item entered the memory (saturates at 32767)
    mem_seq   int32  event clock of the last touch (-1 = empty)
    mem_ts    int32  wall clock of the last touch, seconds since 2020-01-01 UTC (1952..2088)
    mem_sess  int32  session counter of the last touch
    mem_etype int8   event type of the last touch
    mem_seen  int8   bit set of every event type the item got while in memory

Three ways to score the memory (`ModelConfig.repeat`), all through `memory_scores` so that the
evaluation, the training loss and the live `Retriever` share ONE definition:

- "mixture" (RepeatNet-style, learned): P(i) = (1 - g) P_explore(i) + g P_repeat(i), with
  P_explore = softmax over the full catalogue of <u, x_i>, P_repeat = softmax over the memory
  slots of an MLP of the slot's behaviour features, g = sigmoid(gate([u ; long-term state ; pooled slots])).
  Ranking score = log P(i). Trained by the mixture's full-catalogue NLL (models/train.py).
- "rule": the fixed "recent items first, by count then recency" bonus (what the counting
  baselines use for their "+rep" variant).
- "none": explore path only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livemb.core.choices import EXCLUDE_SEEN, REPEAT_PATHS
from livemb.core.errors import ConfigError
from livemb.models.slot_mlp import slot_scores

REPEATS = REPEAT_PATHS  # served repeat paths: the model's own, the fixed rule, none
EXCLUDES = EXCLUDE_SEEN  # exclude_seen: which memory items a ranking removes


@dataclass(frozen=True)
class Variant:
    """What a model serves: its repeat path ("rep" = its own mode, "rule", "norep") and the
    exclude_seen mask. Chosen from the training data (models/early_stop.py), carried by the
    checkpoint, named "<repeat>+<exclude_seen>" as in the evaluation report."""

    repeat: str = "rep"
    exclude_seen: str = "none"

    def __post_init__(self):
        if self.repeat not in REPEATS or self.exclude_seen not in EXCLUDES:
            raise ConfigError(f"a variant is <{'|'.join(REPEATS)}>+<{'|'.join(EXCLUDES)}>, got {self.name!r}")

    @property
    def name(self) -> str:
        return f"{self.repeat}+{self.exclude_seen}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        rep, _, excl = name.partition("+")
        return cls(rep, excl or "none")

    def mode(self, own: str) -> str:
        """The repeat mode (core.choices.REPEAT_MODES) this variant scores with, for a model whose own mode is `own`."""
        return {"rep": own, "rule": "rule", "norep": "none"}[self.repeat]


MEMORY_FIELDS = ("mem_item", "mem_count", "mem_seq", "mem_ts", "mem_sess", "mem_etype", "mem_seen")
EPOCH_S = 1_577_836_800  # 2020-01-01 UTC: the origin of mem_ts
COUNT_MAX = 32767


def memory_spec(M: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {
        "mem_item": ((M,), torch.int64),  # int64: the live hot swap remaps it with ItemTable.lookup (int64)
        "mem_count": ((M,), torch.int16),
        "mem_seq": ((M,), torch.int32),
        "mem_ts": ((M,), torch.int32),
        "mem_sess": ((M,), torch.int32),
        "mem_etype": ((M,), torch.int8),
        "mem_seen": ((M,), torch.int8),
    }


def init_memory(B: int, M: int, device: torch.device) -> dict[str, Tensor]:
    st = {k: torch.zeros((B, *shape), dtype=dt, device=device) for k, (shape, dt) in memory_spec(M).items()}
    st["mem_seq"].fill_(-1)  # empty slots are the oldest, so they fill first
    st["mem_sess"].fill_(-1)
    return st


def to_seconds(ts_ms: Tensor) -> Tensor:
    """Epoch ms (int64) -> the memory's int32 wall clock."""
    return (torch.div(ts_ms, 1000, rounding_mode="floor") - EPOCH_S).to(torch.int32)


def update_memory(st: dict[str, Tensor], item: Tensor, ts: Tensor, etype: Tensor, session: Tensor, seq: Tensor) -> dict[str, Tensor]:
    """Record one event per user (B,) in the memory; unknown items (0) are not stored.

    Returns the memory fields in their storage dtypes (so a streamed state keeps its record size)."""
    M = st["mem_item"].shape[1]
    item32 = item.to(st["mem_item"].dtype)
    known = item > 0
    hit = (st["mem_item"] == item32[:, None]) & known[:, None]  # (B, M)
    has_hit = hit.any(dim=1)
    slot = torch.where(has_hit, hit.to(torch.int8).argmax(dim=1), st["mem_seq"].argmin(dim=1))
    sel = F.one_hot(slot, M).bool() & known[:, None]  # (B, M)
    one = torch.ones_like(st["mem_count"])
    count = torch.where(has_hit[:, None], (st["mem_count"] + (st["mem_count"] < COUNT_MAX).to(one.dtype)), one)
    bit = torch.bitwise_left_shift(torch.ones_like(etype), etype).to(torch.int8)  # (B,)
    seen = torch.where(has_hit[:, None], st["mem_seen"] | bit[:, None], bit[:, None].expand_as(st["mem_seen"]))

    def put(field: str, value: Tensor) -> Tensor:
        old = st[field]
        return torch.where(sel, value.to(old.dtype), old)

    return {
        "mem_item": put("mem_item", item32[:, None]),
        "mem_count": put("mem_count", count),
        "mem_seq": put("mem_seq", seq[:, None]),
        "mem_ts": put("mem_ts", to_seconds(ts)[:, None]),
        "mem_sess": put("mem_sess", session[:, None]),
        "mem_etype": put("mem_etype", etype[:, None]),
        "mem_seen": put("mem_seen", seen),
    }


def trim_empty_slots(st: dict[str, Tensor]) -> dict[str, Tensor]:
    """The memory fields cut to the last slot filled in any row (B, M) -> (B, M'), other fields kept.

    Exact for every repeat score: an empty slot scores -inf and adds nothing to the softmax, the
    pooling or the fill count. Training uses it (slots fill from 0 upwards, so short chunks leave
    the tail empty)."""
    cols = (st["mem_item"] > 0).any(dim=0).nonzero()
    k = int(cols.max()) + 1 if len(cols) else 1
    return {key: (v[:, :k] if key in MEMORY_FIELDS or key == CONTEXT_FIELD else v) for key, v in st.items()}


def events_since(st: dict[str, Tensor]) -> Tensor:
    """(B, M) int64 events since each slot's last touch (0 = the user's latest event), from the
    memory's event clock and the user's event count: the recency every slot score reads."""
    return (st["n_events"][:, None] - 1 - st["mem_seq"].long()).clamp(min=0)


# the category context of a slot (`category_counts`, `context_features`): how many of the user's other memory items
# share its category, how many of those were touched in the current session, how long ago the
# latest of them was touched, and whether there is any
CONTEXT_FEATURES = 4
CONTEXT_FIELD = "mem_cat_counts"  # (B, M, 3) int32 `category_counts`, where a replay computed them once


def n_features(n_types: int, categories: bool = False, context: bool = False) -> int:
    return 7 + 2 * n_types + (1 + CONTEXT_FEATURES * int(context) if categories else 0)


def memory_features(st: dict[str, Tensor], n_types: int, categories: Tensor | None = None,
                    context: bool = False) -> Tensor:
    """(B, M, n_features(n_types, categories, context)) features of each slot, relative to the
    user's latest event.

    st needs the memory fields plus n_events, last_ts (ms), session (B,). `categories` (B, M): the
    slots' item category codes (0 = none), for a model that reads them: one more feature, 1 where
    the slot's item shares its category with the latest event's item (shoppers go back to the item
    they compared with the one in front of them; docs/MODELS.md "Item categories"), and with
    `context` the CONTEXT_FEATURES of `context_features` (which category the user keeps coming back
    to, not only the latest one)."""
    filled = (st["mem_item"] > 0).float()
    recency = events_since(st).float()
    gap_s = (to_seconds(st["last_ts"])[:, None].long() - st["mem_ts"].long()).clamp(min=0).float()
    sess_ago = (st["session"][:, None] - st["mem_sess"].long()).clamp(min=0).float()
    bits = torch.arange(n_types, device=filled.device)
    seen = ((st["mem_seen"].long()[..., None] >> bits) & 1).float()  # (B, M, n_types)
    f = torch.cat(
        [
            torch.log1p(st["mem_count"].float())[..., None],
            torch.log1p(recency)[..., None],
            (recency == 0).float()[..., None],
            (torch.log1p(gap_s) / 10.0)[..., None],
            (sess_ago == 0).float()[..., None],
            torch.log1p(sess_ago)[..., None],
            filled[..., None],
            F.one_hot(st["mem_etype"].long(), n_types).float(),
            seen,
            *([] if categories is None else [same_category_as_latest(recency == 0, categories, filled)[..., None]]),
            *([] if categories is None or not context else  # replayed training memories carry them
              [context_features(st[CONTEXT_FIELD] if CONTEXT_FIELD in st else
                                category_counts(categories, recency, _in_current_session(st), filled > 0))]),
        ],
        dim=-1,
    )
    return f * filled[..., None]


def same_category_as_latest(latest: Tensor, categories: Tensor, filled: Tensor) -> Tensor:
    """(B, M) 1.0 where a slot's category (codes (B, M), 0 = none) equals the category of the
    latest event's item, the slot marked `latest` (B, M) (touched by the user's latest event; none
    when that event's item is not in the memory: an unknown or new item, whose category the worker
    cannot know); 0 elsewhere and at empty slots."""
    latest_cat = (categories * (latest & (filled > 0))).sum(dim=1, keepdim=True)  # (B, 1); 0 = unknown
    return ((categories == latest_cat) & (latest_cat > 0) & (filled > 0)).float()


def category_counts(categories: Tensor, recency: Tensor, current: Tensor, filled: Tensor) -> Tensor:
    """(B, M, 3) int32 of each slot from the OTHER filled slots of its category (codes (B, M),
    0 = none): how many, how many of them were touched in the current session (`current` (B, M)),
    and the events since the latest of them (`recency` (B, M); 0 when there is none); all 0 for a
    slot without a category. `context_features` turns them into the slot scorer's features.

    One sort per row by (category, recency), then each category is a run of the sorted row: O(B M
    log M), not the (B, M, M) pairwise comparison (26M pairs a training batch: ~12x slower). Data
    only, so training computes it once per replayed event (models/replay.MemoryCache)."""
    B, M = categories.shape
    if categories.numel() == 0:
        return torch.zeros(B, M, 3, dtype=torch.int32, device=categories.device)
    valid = filled & (categories > 0)
    rec = recency.long().clamp(0, _REC_CAP - 1)
    # a slot outside every category gets a group of its own, above every real category
    group = torch.where(valid, categories.long(), categories.max() + 1 + torch.arange(M, device=rec.device))
    key, order = ((group << _REC_BITS) | rec).sort(dim=1)  # (B, M): by category, then latest first
    group = key >> _REC_BITS
    starts = torch.ones_like(valid)
    starts[:, 1:] = group[:, 1:] != group[:, :-1]
    run = starts.long().cumsum(1) - 1  # (B, M) run index of each sorted position
    size = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run)).gather(1, run)
    cur = current.gather(1, order).long()
    in_session = torch.zeros_like(run).scatter_add_(1, run, cur).gather(1, run) - cur
    rec_sorted = key & (_REC_CAP - 1)
    first = torch.zeros_like(run).scatter_add_(1, run, rec_sorted * starts).gather(1, run)  # the run's latest touch
    second = torch.cat([rec_sorted[:, 1:], rec_sorted[:, -1:]], dim=1)  # the next position's
    others = size - 1
    nearest = torch.where(starts, second, first) * (others > 0)  # the latest OTHER: the run's second for its first
    # back to slot order: one inverse permutation, then gathers
    inv = torch.empty_like(order).scatter_(1, order, torch.arange(M, device=order.device).expand(B, M))
    out = torch.stack([others, in_session, nearest], dim=-1).gather(1, inv[..., None].expand(B, M, 3))
    return (out * valid[..., None]).to(torch.int32)


def context_features(counts: Tensor) -> Tensor:
    """(B, M, CONTEXT_FEATURES) from `category_counts` (B, M, 3): log(1 + others), log(1 + others
    in the current session), log(1 + events since the latest other) and whether there is any."""
    c = counts.float()
    return torch.cat([torch.log1p(c), (counts[..., :1] > 0).float()], dim=-1)


def slot_category_counts(st: dict[str, Tensor], categories: Tensor) -> Tensor:
    """`category_counts` of the memory in `st` (memory fields + n_events, session), codes (B, M)."""
    return category_counts(categories, events_since(st), _in_current_session(st), st["mem_item"] > 0)


def _in_current_session(st: dict[str, Tensor]) -> Tensor:
    """(B, M) bool: the slot was last touched in the user's current session."""
    return st["mem_sess"].long() == st["session"][:, None]


_REC_BITS = 24
_REC_CAP = 1 << _REC_BITS  # recency beyond 16.7M events reads as that (sort key: category << 24 | recency)


class MixtureHead(nn.Module):
    """RepeatNet-style gate and repeat distribution over the memory slots.

    slot MLP: [slot features] -> hidden -> repeat logit
    gate:     [u ; long-term state ; max-pooled slot hidden ; log fill] -> repeat-vs-explore logit

    The slot MLP reads the user's behaviour with the item only (count, recency, time, sessions,
    event types), not the item's explore score: on training data the explore path has seen the
    sequences it predicts, so a slot scorer that reads its score learns to trust it (taobao-dev,
    10 epochs: in-memory recall@10 0.53 with it, 0.62 without; docs/MODELS.md).
    The explore score still enters each memory item's mixture probability, (1 - g) P_explore.
    """

    def __init__(self, n_types: int, dim: int, state_dim: int, hidden: int = 32, categories: bool = False,
                 context: bool = False):
        super().__init__()
        self.slot = nn.Sequential(nn.Linear(n_features(n_types, categories, context), hidden), nn.ReLU())
        self.slot_out = nn.Linear(hidden, 1)
        self.gate = nn.Sequential(nn.Linear(dim + state_dim + hidden + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def slot_logits(self, feats: Tensor, filled: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, M, F), filled (B, M) -> (repeat logit per slot (B, M), -inf at empty slots; the slot
        hidden units max-pooled over the filled slots (B, hid)), fused (models/slot_mlp.py). Shared by
        `forward` and the slot scorer's pre-fit (models/slot_fit.py)."""
        lin = self.slot[0]
        return slot_scores(feats, filled, lin.weight, lin.bias, self.slot_out.weight, self.slot_out.bias)

    def forward(self, feats: Tensor, filled: Tensor, u: Tensor, gate_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """feats (B, M, F), filled (B, M), u (B, D), gate_state (B, G) or None
        -> (repeat log-probs over slots (B, M), -inf at empty slots; gate logit (B,))."""
        logits, pooled = self.slot_logits(feats, filled)
        any_filled = filled.any(dim=1, keepdim=True)
        rep_logp = torch.where(any_filled, torch.log_softmax(logits.masked_fill(~any_filled, 0.0), dim=1), logits)
        parts = [u, pooled, torch.log1p(filled.sum(1, keepdim=True).float())]
        if gate_state is not None:
            parts.insert(1, gate_state)
        a = self.gate(torch.cat(parts, dim=-1)).squeeze(-1)
        return rep_logp, a.masked_fill(~any_filled.squeeze(1), -math.inf)


@dataclass(frozen=True)
class RuleWeights:
    """The rule's order inside the memory: count * log(1 + touches) - recency * log(1 + events since
    the last touch) + current_session * [last touched in the current session] + category * [same
    category as the latest event's item] (the last only for a model that reads item categories).
    Only the ratios matter among memory items; against the explore score that rides on top (a
    counting model's rescaled to [-1, 1], a neural model's logit) the size matters too. Chosen from
    the data like the served variant (`rule_grid`, models/early_stop.choose_rule) and carried by
    the checkpoint."""

    count: float = 10.0
    recency: float = 1.0
    current_session: float = 0.0
    category: float = 0.0

    @property
    def name(self) -> str:
        cat = f", category {self.category:g}" if self.category else ""
        return f"count {self.count:g}, recency {self.recency:g}, current session {self.current_session:g}{cat}"

    def to_dict(self) -> dict[str, float]:
        return {"count": self.count, "recency": self.recency, "current_session": self.current_session,
                "category": self.category}

    @classmethod
    def from_dict(cls, d: dict) -> RuleWeights:
        """A dict from a checkpoint; one written before the category term reads category 0."""
        try:
            w = cls(**{k: float(v) for k, v in d.items()})
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"rule weights are count, recency, current_session and category numbers, got {d!r}") from e
        if not all(math.isfinite(x) for x in (w.count, w.recency, w.current_session, w.category)):
            raise ConfigError(f"rule weights must be finite, got {d!r}")
        return w


# The gate's serving-time shift (`SeqModel.gate_shift`, added to the gate's logit): the candidates the
# held-out tail chooses among when `TrainConfig.calibrate_gate` is on (0 = the gate as trained).
GATE_SHIFT_GRID = (0.0, 1.0, 2.0, 4.0)

DEFAULT_RULE = RuleWeights()  # "by count, then recency": what a model without a choice serves
# The orders the held-out tail chooses among: count first (the default), count and recency
# balanced, recency first; each without and with a bonus for the current session's items.
RULE_GRID = tuple(RuleWeights(c, 1.0, s) for s in (0.0, 3.0) for c in (10.0, 3.0, 1.0, 0.0))
# ... and, for a model that reads item categories, each of those with a bonus for the latest item's category
RULE_GRID_CATEGORIES = RULE_GRID + tuple(RuleWeights(w.count, w.recency, w.current_session, 3.0) for w in RULE_GRID)


def heuristic_bonus(st: dict[str, Tensor], w: RuleWeights, categories: Tensor | None = None, big: float = 1e3) -> Tensor:
    """The rule: recent items first (`big` above any explore score), ordered inside the memory by
    `w` (B, M); 0 at empty slots. `categories` (B, M): the slots' category codes, for the category
    term (None: no term, whatever `w.category`)."""
    recency = events_since(st).float()
    bonus = big + torch.log1p(st["mem_count"].float()) * w.count - torch.log1p(recency) * w.recency
    if w.current_session:
        bonus = bonus + w.current_session * _in_current_session(st).float()
    filled = st["mem_item"] > 0
    if w.category and categories is not None:
        bonus = bonus + w.category * same_category_as_latest(recency == 0, categories, filled)
    return bonus * filled


def add_to_scores(scores: Tensor, mem_item: Tensor, bonus: Tensor) -> Tensor:
    """scores (B, N+1) + bonus (B, M) at the memory's item columns (slots hold distinct items)."""
    return scores.scatter_add(1, mem_item.long(), bonus.to(scores.dtype))


def excluded_slots(st: dict[str, Tensor], mode: str) -> Tensor | None:
    """(B, M) bool: the memory slots exclude_seen = none / session / history removes (None for none)."""
    if mode == "none":
        return None
    keep = st["mem_item"] > 0
    if mode == "session":
        keep &= _in_current_session(st)
    elif mode != "history":
        raise ValueError(f"exclude_seen must be none, session or history, got {mode!r}")
    return keep


def seen_mask(st: dict[str, Tensor], n_cols: int, mode: str) -> Tensor | None:
    """(B, N+1) bool of items to exclude for exclude_seen = none / session / history.

    'history' means the items in the recent-items memory (bounded by M): the live service and the
    evaluation share this definition.
    """
    keep = excluded_slots(st, mode)
    if keep is None:
        return None
    mask = torch.zeros(st["mem_item"].shape[0], n_cols, dtype=torch.bool, device=st["mem_item"].device)
    mask.scatter_(1, st["mem_item"].long(), keep)
    mask[:, 0] = False
    return mask
