"""The repeat path: a fixed-size memory of each user's recent items and a head that scores them.

Real click logs are dominated by re-interactions, which an explore-only model (<u, x_item> over
the catalogue) ranks poorly. The memory keeps M slots per user; each slot holds an item, how often
and when (event clock and wall clock) it was touched, in which session and with which event type.
The learned head turns those features (plus the explore score of the item) into an additive
logit, so the final ranking mixes both paths in logit space (RepeatNet in spirit):

    score(i) = <u, x_i> + [i in memory] * head(features_i, <u, x_i>)

Slots are replaced least-recently-used (by event clock, ties to the lowest slot), so streaming and
offline runs evict identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEMORY_FIELDS = ("mem_item", "mem_count", "mem_ts", "mem_etype", "mem_sess", "mem_seq")


def memory_spec(M: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {
        "mem_item": ((M,), torch.int64),
        "mem_count": ((M,), torch.float32),
        "mem_ts": ((M,), torch.int64),
        "mem_etype": ((M,), torch.int64),
        "mem_sess": ((M,), torch.int64),
        "mem_seq": ((M,), torch.int64),
    }


def init_memory(B: int, M: int, device: torch.device) -> dict[str, Tensor]:
    st = {k: torch.zeros((B, *shape), dtype=dt, device=device) for k, (shape, dt) in memory_spec(M).items()}
    st["mem_seq"].fill_(-1)  # empty slots are the oldest, so they fill first
    st["mem_sess"].fill_(-1)
    return st


def update_memory(st: dict[str, Tensor], item: Tensor, ts: Tensor, etype: Tensor, session: Tensor, seq: Tensor) -> dict[str, Tensor]:
    """Record one event per user (B,) in the memory; unknown items (0) are not stored."""
    M = st["mem_item"].shape[1]
    known = item > 0
    hit = (st["mem_item"] == item[:, None]) & known[:, None]  # (B, M)
    has_hit = hit.any(dim=1)
    slot = torch.where(has_hit, hit.to(torch.int8).argmax(dim=1), st["mem_seq"].argmin(dim=1))
    sel = F.one_hot(slot, M).bool() & known[:, None]  # (B, M)
    count = torch.where(has_hit[:, None], st["mem_count"] + 1.0, torch.ones_like(st["mem_count"]))
    return {
        "mem_item": torch.where(sel, item[:, None], st["mem_item"]),
        "mem_count": torch.where(sel, count, st["mem_count"]),
        "mem_ts": torch.where(sel, ts[:, None], st["mem_ts"]),
        "mem_etype": torch.where(sel, etype[:, None], st["mem_etype"]),
        "mem_sess": torch.where(sel, session[:, None], st["mem_sess"]),
        "mem_seq": torch.where(sel, seq[:, None], st["mem_seq"]),
    }


def memory_features(st: dict[str, Tensor], n_types: int) -> Tensor:
    """(B, M, 4 + n_types) features of each slot, relative to the user's latest event."""
    recency = (st["n_events"][:, None] - 1 - st["mem_seq"]).clamp(min=0).float()
    gap_s = (st["last_ts"][:, None] - st["mem_ts"]).clamp(min=0).float() / 1000.0
    same_session = (st["mem_sess"] == st["session"][:, None]).float()
    return torch.cat(
        [
            torch.log1p(st["mem_count"])[..., None],
            torch.log1p(recency)[..., None],
            (torch.log1p(gap_s) / 10.0)[..., None],
            same_session[..., None],
            F.one_hot(st["mem_etype"], n_types).float(),
        ],
        dim=-1,
    )


class RepeatHead(nn.Module):
    def __init__(self, n_types: int, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 + n_types + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, feats: Tensor, explore: Tensor) -> Tensor:
        # feats (B, M, F), explore (B, M) -> (B, M)
        return self.mlp(torch.cat([feats, explore[..., None]], dim=-1)).squeeze(-1)


def heuristic_bonus(st: dict[str, Tensor], big: float = 1e3) -> Tensor:
    """Non-learned repeat path for the baselines' "+rep" variants: recent items first, ordered by
    count then recency (a fixed rule, so the comparison with the learned head stays fair)."""
    recency = (st["n_events"][:, None] - 1 - st["mem_seq"]).clamp(min=0).float()
    bonus = big + torch.log1p(st["mem_count"]) * 10.0 - torch.log1p(recency)
    return bonus * (st["mem_item"] > 0)


def add_to_scores(scores: Tensor, mem_item: Tensor, bonus: Tensor) -> Tensor:
    """scores (B, N+1) + bonus (B, M) at the memory's item columns (slots hold distinct items)."""
    return scores.scatter_add(1, mem_item, bonus.to(scores.dtype))


def seen_mask(st: dict[str, Tensor], n_cols: int, mode: str) -> Tensor | None:
    """(B, N+1) bool of items to exclude for exclude_seen = none / session / history.

    'history' means the items in the recent-items memory (bounded by M): the live service and the
    evaluation share this definition.
    """
    if mode == "none":
        return None
    keep = st["mem_item"] > 0
    if mode == "session":
        keep &= st["mem_sess"] == st["session"][:, None]
    elif mode != "history":
        raise ValueError(f"exclude_seen must be none, session or history, got {mode!r}")
    mask = torch.zeros(st["mem_item"].shape[0], n_cols, dtype=torch.bool, device=st["mem_item"].device)
    mask.scatter_(1, st["mem_item"], keep)
    mask[:, 0] = False
    return mask
