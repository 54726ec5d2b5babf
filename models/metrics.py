"""Ranking metrics against the full item catalogue (the seeds' definitions).

Column 0 of a score matrix is the "unknown item" and never competes. Ties are pessimistic: the
rank of the target is 1 + the number of OTHER catalogue items whose score is >= the target's, so a
model that scores everything equally gets the worst rank, not the best. NaN scores count as >=
(a NaN anywhere loses), and a NaN target score loses to every other item.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

RECALL_KS: tuple[int, ...] = (1, 5, 10, 20)


def ranks_of(scores: Tensor, target: Tensor, excluded: Tensor | None = None) -> Tensor:
    """Pessimistic 1-based rank of each target item among the N catalogue items.

    scores (B, N+1) float, target (B,) int64 item indices in 1..N, excluded (B, N+1) bool or None
    (items that never count as competitors, e.g. an exclude_seen mask). A target that is itself
    excluded (or is the unknown item 0) gets rank N, the worst. Returns (B,) int64.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N+1), got {tuple(scores.shape)}")
    B, n_cols = scores.shape
    N = n_cols - 1
    target = target.to(device=scores.device, dtype=torch.int64).view(B)
    t_score = scores.gather(1, target[:, None])  # (B, 1)
    ge = (scores >= t_score) | torch.isnan(scores) | torch.isnan(t_score)
    ge[:, 0] = False  # the unknown item never competes
    ge.scatter_(1, target[:, None], False)  # the target is not its own competitor
    if excluded is not None:
        excluded = excluded.to(device=scores.device, dtype=torch.bool)
        ge &= ~excluded
        target_out = excluded.gather(1, target[:, None]).squeeze(1)
    else:
        target_out = torch.zeros(B, dtype=torch.bool, device=scores.device)
    target_out |= target <= 0
    rank = 1 + ge.sum(dim=1)
    return torch.where(target_out, torch.full_like(rank, N), rank)


class RankAccumulator:
    """Running sums of per-event ranks; `summary` gives Recall@K, MRR, MRP and the count."""

    def __init__(self, ks: tuple[int, ...] = RECALL_KS):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.hits = {k: 0 for k in self.ks}
        self.sum_rr = 0.0
        self.sum_rank = 0.0

    def add(self, ranks: Tensor | np.ndarray) -> None:
        r = torch.as_tensor(ranks).detach().reshape(-1).to("cpu", torch.float64)
        if r.numel() == 0:
            return
        if bool((r < 1).any()):
            raise ValueError("ranks are 1-based")
        self.n += int(r.numel())
        for k in self.ks:
            self.hits[k] += int((r <= k).sum())
        self.sum_rr += float((1.0 / r).sum())
        self.sum_rank += float(r.sum())

    def merge(self, other: RankAccumulator) -> None:
        if other.ks != self.ks:
            raise ValueError("cannot merge accumulators with different K lists")
        self.n += other.n
        for k in self.ks:
            self.hits[k] += other.hits[k]
        self.sum_rr += other.sum_rr
        self.sum_rank += other.sum_rank

    def summary(self, n_items: int) -> dict:
        """recall@K (fraction of scored targets with rank <= K), mrr (mean 1/rank), mrp (mean
        rank / n_items) and events_scored. With nothing scored every metric is 0.0."""
        n = self.n
        out: dict = {f"recall@{k}": (self.hits[k] / n if n else 0.0) for k in self.ks}
        out["mrr"] = self.sum_rr / n if n else 0.0
        out["mrp"] = self.sum_rank / n / n_items if n else 0.0
        out["events_scored"] = n
        return out


def over_all_events(summary: dict, unscored: int) -> dict:
    """recall@K and MRR of `summary` over every target, the `unscored` ones (an item the model
    cannot rank: unknown to the catalogue) counted as misses: what a live deployment sees."""
    n = summary["events_scored"]
    share = n / (n + unscored) if n + unscored else 0.0
    out = {k: v * share for k, v in summary.items() if k.startswith("recall@") or k == "mrr"}
    out["events"] = n + unscored
    return out


__all__ = ["RECALL_KS", "RankAccumulator", "over_all_events", "ranks_excluding_memory", "ranks_from_explore", "ranks_of"]


def ranks_excluding_memory(scores: Tensor, target: Tensor, mem_item: Tensor, excluded: dict[str, Tensor]) -> dict[str, Tensor]:
    """`ranks_of` without a mask and with each exclude_seen mask, from ONE (B, N+1) comparison.

    The masks of exclude_seen only ever exclude memory items, so each masked rank is the unmasked
    rank minus the excluded memory items that beat the target (slots hold distinct items): the
    same numbers as `ranks_of(scores, target, mask)` for the (B, N+1) mask built from the slots.
    excluded: name -> (B, M) bool (slot excluded); returns {"none": ranks, name: ranks, ...}.
    """
    B, n_cols = scores.shape
    N = n_cols - 1
    target = target.to(device=scores.device, dtype=torch.int64).view(B)
    out = {"none": ranks_of(scores, target)}
    mem = mem_item.to(device=scores.device, dtype=torch.int64)
    t_score = scores.gather(1, target[:, None])  # (B, 1)
    ms = scores.gather(1, mem)  # (B, M)
    beats = (ms >= t_score) | torch.isnan(ms) | torch.isnan(t_score)
    other = (mem > 0) & (mem != target[:, None])
    is_target = (mem == target[:, None]) & (mem > 0)
    for name, ex in excluded.items():
        drop = (beats & other & ex).sum(dim=1)
        target_out = (ex & is_target).any(dim=1) | (target <= 0)
        out[name] = torch.where(target_out, torch.full_like(out["none"], N), out["none"] - drop)
    return out


_LANES = 8 * 255  # bytes per int64 word x words summed before a byte lane could overflow


def count_below(x: Tensor, thr: Tensor) -> Tensor:
    """(x < thr).sum(dim=1) for x (B, N) float and thr (B, 1), as int64 (B,), ~10x faster than
    summing the bool matrix on the CPU: the comparison is written into a zero-padded bool buffer,
    whose bytes are summed as int64 words (8 byte lanes at once, 255 words at most so no lane
    overflows) and only then unpacked. NaN compares False (never below), as `<` does."""
    B, N = x.shape
    width = -(-N // _LANES) * _LANES
    buf = torch.zeros(B, width, dtype=torch.bool, device=x.device)
    torch.lt(x, thr, out=buf[:, :N])
    lanes = buf.view(torch.int64).view(B, -1, 255).sum(dim=2)  # (B, C), every byte lane <= 255
    return lanes.view(torch.uint8).view(B, -1).sum(dim=1, dtype=torch.int64)


def ranks_from_explore(base: Tensor, target: Tensor, mem_item: Tensor, shift: Tensor, mem: Tensor,
                       excluded: dict[str, Tensor], pool_key: Tensor | None = None,
                       target_key: Tensor | None = None, ext: Tensor | None = None,
                       ext_target: Tensor | None = None) -> dict[str, Tensor]:
    """The ranks of `ranks_excluding_memory` for the merged score "base + shift outside the memory,
    `mem` at the memory's slots", without building that (B, N+1) matrix: ONE (B, N) comparison of
    the shared explore scores `base` against a per-row threshold, corrected on the (B, M) slots.

    base (B, N+1) explore scores (column 0 never competes), target (B,), mem_item (B, M) distinct
    items (0 = empty), shift (B,), mem (B, M) merged scores of the slots, excluded: name -> (B, M)
    bool. A non-memory item j beats the target iff base_j + shift >= t, i.e. base_j >= t - shift
    (the same test up to float rounding of the shift: exact when shift is 0). NaN competes as >=;
    a NaN target loses to every competitor, as in `ranks_of`.

    `pool_key` (B, S): the open catalogue's new items (models/newitems.py), whose merged scores
    follow the memory's in `mem` (B, M + S) and in each excluded mask; `target_key` (B,): the
    target's new-item key (0 for a catalogue item). A target found in the pool is ranked by its
    slot's score; the pool's other items compete like memory items.

    `ext` (B, E): merged scores of the explore extension's new items (models/newvectors.py; -inf
    for padding and for the user's pool items, which the pool scores), `ext_target` (B, E) bool:
    the target's column. A target found there (and not in the pool) is ranked by that score; the
    extension's other items compete like catalogue items."""
    B, n_cols = base.shape
    N = n_cols - 1
    target = target.to(device=base.device, dtype=torch.int64).view(B)
    mem_item = mem_item.to(device=base.device, dtype=torch.int64)
    filled = mem_item > 0
    is_target = filled & (mem_item == target[:, None])
    filled_all, is_target_all = filled, is_target
    if pool_key is not None:
        p_filled = pool_key > 0
        p_target = p_filled & (pool_key == target_key[:, None]) & (target_key > 0)[:, None]
        filled_all, is_target_all = torch.cat([filled, p_filled], 1), torch.cat([is_target, p_target], 1)
    in_mem = is_target_all.any(dim=1)
    base_t = base.gather(1, target[:, None]).squeeze(1)
    mem_t = mem.masked_fill(~is_target_all, -math.inf).amax(dim=1)
    t = torch.where(in_mem, mem_t, base_t + shift)  # (B,) the target's merged score
    in_ext = torch.zeros_like(in_mem)
    if ext is not None and not ext.shape[1]:
        ext = None  # an empty extension
    if ext is not None:
        in_ext = ext_target.any(dim=1) & ~in_mem
        t = torch.where(in_ext, ext.masked_fill(~ext_target, -math.inf).amax(dim=1), t)
    thr = (t - shift)[:, None]
    # catalogue items (1..N) whose explore score is not below the threshold: NaN counts
    n_ge = N - count_below(base[:, 1:], thr)
    base_mem = base.gather(1, mem_item)
    mem_ge_base = filled & ~(base_mem < thr)  # the memory items counted in n_ge (by their explore score)
    target_counted = ~in_mem & ~in_ext & ~(base_t < thr.squeeze(1)) & (target > 0)  # the target itself, outside memory
    outside = n_ge - mem_ge_base.sum(dim=1) - target_counted.long()
    beats = filled_all & ~is_target_all & ~(mem < t[:, None])  # memory competitors by their merged score
    rank = 1 + outside + beats.sum(dim=1)
    if ext is not None:  # the extension's items (padding is -inf: never >= a finite target score)
        rank = rank + (~ext_target & (ext > -math.inf) & ~(ext < t[:, None])).sum(dim=1)
    worst = (target <= 0) & ~in_mem & ~in_ext  # a NaN target already counts every other item as a competitor
    full = torch.full_like(rank, N)
    out = {"none": torch.where(worst, full, rank)}
    for name, ex in excluded.items():
        ex = ex.to(device=base.device, dtype=torch.bool)
        drop = (beats & ex).sum(dim=1)
        out[name] = torch.where(worst | (ex & is_target_all).any(dim=1), full, rank - drop)
    return out
