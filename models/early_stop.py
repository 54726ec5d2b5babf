"""Early stopping: choose the epoch count on a held-out tail of the TRAIN period (never the test).

`split_validation` cuts the training histories by time, as the evaluation's temporal split does
(events with ts >= lo + (1 - valid_fraction) * (hi - lo) are validation events), and keeps up to
`valid_max_targets` validation targets (whole users, a fixed random order). `Validator` scores them
after each epoch with the model's own repeat path, exclude_seen none, against the full catalogue:
the same ranking as `livemb evaluate` (models/evaluation.variant_ranks, pessimistic ties), but
teacher-forced through the offline forward over each user's fit + validation events in
one pass, which the parity tests make equal to stepping the streaming state through them. Left out:
a user's very first event (nothing to predict it from).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livemb.models.base import EventBatch, SeqModel
from livemb.models.evaluation import VARIANTS, variant_name, variant_ranks
from livemb.models.metrics import RankAccumulator
from livemb.models.repeat import DEFAULT_RULE, REPEATS, RuleWeights, Variant
from livemb.models.replay import MemoryCache, Sequence, next_item_predictions


@dataclass
class ValidationSplit:
    fit: list[Sequence]  # every history cut to its events before the cut (empty ones dropped)
    valid: list[Sequence]  # the kept users' fit events followed by their validation events
    starts: list[int]  # per kept user: index of the first validation event in `valid`
    targets: int  # known validation targets kept (positions >= start >= 1)
    targets_total: int  # before the cap
    cut_ms: int


def split_validation(seqs: list[Sequence], fraction: float, max_targets: int, seed: int) -> ValidationSplit:
    """Split by time; the kept validation users are a seeded random subset up to `max_targets` targets.

    The validation follows the test protocol: its catalogue is what the fit part has seen, so an
    item that first occurs in the validation window is an unknown item there (index 0: skipped as
    a target, kept out of the memory), as a test item absent from the train period is. Without
    this, 30 % of taobao-dev's validation targets were repeats against 69 % of the test's scored
    ones, and the epoch and variant chosen there served the test badly."""
    ts_all = [s[2] for s in seqs if len(s[2])]
    lo = min(int(t.min()) for t in ts_all)
    hi = max(int(t.max()) for t in ts_all)
    cut = int(np.ceil(lo + (1.0 - fraction) * (hi - lo)))
    n_items = max((int(s[0].max()) for s in seqs if len(s[0])), default=0)
    seen = np.zeros(n_items + 1, bool)
    for it, _, ts in seqs:
        seen[it[ts < cut]] = True
    seen[0] = False
    fit, cand, starts, counts = [], [], [], []
    for it, et, ts in seqs:
        late = ts >= cut
        head = (it[~late], et[~late], ts[~late])
        if len(head[0]):
            fit.append(head)
        if late.any():
            it = np.where(late & ~seen[it], 0, it)  # items new in the validation window are unknown there
            full = tuple(np.concatenate([a[~late], a[late]]) for a in (it, et, ts))
            start = max(int((~late).sum()), 1)  # the first event of a new user has no prediction
            n = int((full[0][start:] > 0).sum())
            if n:
                cand.append(full)
                starts.append(start)
                counts.append(n)
    order = np.random.default_rng(seed).permutation(len(cand))
    cum = np.cumsum(np.asarray(counts, np.int64)[order]) if cand else np.zeros(0, np.int64)
    keep = order[: int(np.searchsorted(cum, max_targets, side="left")) + 1] if cand else order
    keep = np.sort(keep)
    return ValidationSplit(fit=fit, valid=[cand[i] for i in keep], starts=[starts[i] for i in keep],
                           targets=int(sum(counts[i] for i in keep)), targets_total=int(sum(counts)), cut_ms=cut)


def per_target(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Each target's contribution to `metric` ("recall@K" or "mrr") from its rank."""
    if metric == "mrr":
        return 1.0 / ranks
    return (ranks <= int(metric.split("@")[1])).astype(np.float64)


def paired_gain(new: np.ndarray, ref: np.ndarray, se_units: float) -> tuple[float, float]:
    """(gain, need): the mean per-target gain of `new` over `ref` on the same targets, and what it
    must exceed to count: `se_units` standard errors of that paired difference. Paired, because two
    epochs (or two variants) rank the same targets and mostly agree: the SE of the difference is a
    fraction of either metric's own (taobao-dev, 925 targets: a steady +0.008 MRR an epoch against
    an unpaired SE of 0.013, which stopped training after one epoch)."""
    d = new - ref
    n = len(d)
    if n < 2 or se_units <= 0:
        return float(d.mean()) if n else 0.0, 0.0
    return float(d.mean()), se_units * float(d.std(ddof=1)) / math.sqrt(n)


# the explore path alone, nothing masked: how well the published embedding ranks by itself
EMBEDDING_VARIANT = variant_name("norep", "none")


@dataclass(frozen=True)
class Verdict:
    by: str | None  # "served" (its served ranking is better), "embedding" (held, and its embedding better), None
    gain: float | None  # served: the mean per-target gain over the best served ranking (None at the first epoch)
    min_gain: float  # ... and what it had to exceed
    note: str  # for the log

    @property
    def chosen(self) -> bool:
        """This epoch is the new chosen one."""
        return self.by is not None


@dataclass
class EpochJudge:
    """Which epoch early stopping keeps. An epoch becomes the chosen one when
    - its served ranking beats the best served ranking so far by more than the noise
      (`paired_gain`, `min_gain_se` standard errors), or
    - its served ranking is no worse than that best (a gain >= 0, within the noise; with
      `allow_loss_se` > 0 a loss of up to that many standard errors), and its embedding alone
      (`EMBEDDING_VARIANT`) beats the chosen epoch's by more than the noise.
    The second clause keeps training the published embedding while the served ranking holds: a
    served ranking led by the user's own items can be flat from the first epochs on while the
    explore path is still far from trained (taobao-dev: docs/MODELS.md "Early stopping"). The
    served reference moves only on a served gain beyond the noise, and an epoch below it never
    counts, so the served ranking cannot drift down. (Allowing a loss within the noise let it: on
    taobao-dev the choice went from epoch 7 to 11 and the test's recall@10 fell by 0.008. With the
    mixture gate calibrated on the held-out tail at every epoch, `TrainConfig.calibrate_gate`, the
    served ranking holds over the late epochs, and the loss within the noise is allowed.)"""

    min_gain_se: float
    allow_loss_se: float = 0.0  # the embedding clause: a served loss of up to this many standard errors
    served_ref: np.ndarray | None = None  # per-target values of the best served ranking
    embedding_ref: np.ndarray | None = None  # the chosen epoch's embedding-alone values

    def __call__(self, served: np.ndarray, embedding: np.ndarray | None) -> Verdict:
        if self.served_ref is None:
            self.served_ref, self.embedding_ref = served, embedding
            return Verdict("served", None, 0.0, "best")
        gain, need = paired_gain(served, self.served_ref, self.min_gain_se)
        if gain > need:
            self.served_ref, self.embedding_ref = served, embedding
            return Verdict("served", gain, need, "best")
        note = f"gain {gain:+.4f} over the best, needs > {need:.4f}"
        floor = -self.allow_loss_se * paired_gain(served, self.served_ref, 1.0)[1] if self.allow_loss_se else 0.0
        if embedding is None or self.embedding_ref is None or gain < floor:
            return Verdict(None, gain, need, note)
        e_gain, e_need = paired_gain(embedding, self.embedding_ref, self.min_gain_se)
        if e_gain > e_need:
            self.embedding_ref = embedding
            return Verdict("embedding", gain, need,
                           f"chosen: {note}, and the embedding alone gained {e_gain:+.4f} (> {e_need:.4f})")
        return Verdict(None, gain, need, f"{note}; the embedding alone {e_gain:+.4f}, needs > {e_need:.4f}")


def rule_variants(own_mode: str) -> list[str]:
    """The variants a model whose own repeat mode is `own_mode` ranks with the rule."""
    return [variant_name(r, e) for r, e in VARIANTS if Variant(r).mode(own_mode) == "rule"]


def best_beyond_noise(scores: dict, values: Callable[[Any], np.ndarray], default, min_gain_se: float):
    """The key of `scores` with the best score, unless its gain over `default` on the same targets
    (`values(key)`: per-target contributions, `per_target`) is within `min_gain_se` standard errors
    of the paired difference (`paired_gain`): then `default`, which also wins ties. Chooses the
    served variant, the rule's weights and so what a checkpoint serves: a noise-level difference
    never switches it."""
    best = max(scores, key=lambda k: (scores[k], k == default))
    if best == default or default not in scores:
        return best
    gain, need = paired_gain(values(best), values(default), min_gain_se)
    return best if gain > need else default


def _best_rule_variant(val: Validation, names: list[str], metric: str) -> str:
    return max(names, key=lambda v: val.metrics[v][metric])


def choose_rule(vals: dict[RuleWeights, Validation], own_mode: str, metric: str, min_gain_se: float) -> RuleWeights:
    """The rule's weights from one `Validator.by_rule` pass: each candidate is worth its best rule
    variant on the held-out targets (`best_beyond_noise` against DEFAULT_RULE's)."""
    names = [v for v in rule_variants(own_mode) if all(v in val.metrics for val in vals.values())]
    best = {w: _best_rule_variant(val, names, metric) for w, val in vals.items()}
    return best_beyond_noise({w: vals[w].metrics[best[w]][metric] for w in vals},
                             lambda w: vals[w].values(best[w], metric), DEFAULT_RULE, min_gain_se)


def rule_report(vals: dict[RuleWeights, Validation], chosen: RuleWeights, own_mode: str, metric: str) -> dict:
    """What the history keeps of a rule choice: the chosen weights and each candidate's best rule variant."""
    names = rule_variants(own_mode)
    return {"chosen": chosen.to_dict(), "metric": metric,
            "candidates": [{**w.to_dict(), "variant": (v := _best_rule_variant(val, names, metric)),
                            metric: val.metrics[v][metric]} for w, val in vals.items()]}


@dataclass
class Validation:
    """One validation pass: every variant's metrics and its per-target ranks (the same targets,
    in the same order, on every pass)."""

    metrics: dict[str, dict]
    ranks: dict[str, np.ndarray]

    def values(self, variant: str, metric: str) -> np.ndarray:
        return per_target(self.ranks[variant], metric)


class Validator:
    """Ranks of the validation targets under the model's current weights (no gradients).

    The memory after every validation-sequence event is replayed once (models.replay.MemoryCache
    over whole sequences, so it equals the streaming memory); each call runs the offline forward
    over the kept users in length-sorted batches and scores only the validation positions."""

    def __init__(self, model: SeqModel, split: ValidationSplit, batch_events: int = 65_536):
        self.split = split
        self.memory = MemoryCache(model, split.valid)
        lengths = np.fromiter((len(s[0]) for s in split.valid), np.int64, len(split.valid))
        order = np.argsort(-lengths, kind="stable")
        self.batches: list[list[int]] = []
        cur: list[int] = []
        for i in order.tolist():  # longest first: a batch's padded size is its first row's length
            if cur and (len(cur) + 1) * lengths[cur[0]] > batch_events:
                self.batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            self.batches.append(cur)

    def __call__(self, model: SeqModel) -> Validation:
        """Every served variant's (models.repeat.Variant) metrics and ranks at the current weights."""
        return self.by_rule(model, (model.rule,))[model.rule]

    def by_gate_shift(self, model: SeqModel, shifts: tuple[float, ...]) -> dict[float, Validation]:
        """One pass, every variant under each gate shift (`SeqModel.gate_shift`); `model.gate_shift`
        is left as it was."""
        vals = self._by_setting(model, tuple((model.rule, s) for s in shifts))
        return {s: v for (_, s), v in vals.items()}

    def by_rule(self, model: SeqModel, rules: tuple[RuleWeights, ...]) -> dict[RuleWeights, Validation]:
        """One pass, every variant under each of `rules` (the repeat rule's weights); `model.rule` is
        left as it was."""
        vals = self._by_setting(model, tuple((w, model.gate_shift) for w in rules))
        return {w: v for (w, _), v in vals.items()}

    @torch.no_grad()
    def _by_setting(self, model: SeqModel, settings: tuple[tuple[RuleWeights, float], ...]
                    ) -> dict[tuple[RuleWeights, float], Validation]:
        """One pass for several (rule, gate shift) settings: the forward, the explore scores and
        the variants a setting does not change against the first are computed once."""
        settings = tuple(dict.fromkeys(settings))
        was_training, own = model.training, (model.rule, model.gate_shift)
        model.eval()
        names = [variant_name(r, e) for r, e in VARIANTS]
        with_rule = {r for r in REPEATS if Variant(r).mode(model.repeat_mode) == "rule"}
        with_gate = {r for r in REPEATS if Variant(r).mode(model.repeat_mode) == "mixture"}

        def changed(key: tuple[RuleWeights, float]) -> tuple[str, ...]:
            """The repeat paths whose ranks `key` changes against the first setting."""
            rule, shift = key
            out = (with_rule if rule != settings[0][0] else set()) | (with_gate if shift != settings[0][1] else set())
            return tuple(r for r in REPEATS if r in out)

        accs = {k: {name: RankAccumulator() for name in names} for k in settings}
        parts: dict[tuple, dict[str, list[np.ndarray]]] = {k: {name: [] for name in names} for k in settings}
        block = max(1, (1 << 24) // (model.n_items + 1))  # rows per (rows, N+1) score block: 64 MB
        try:
            for b in self.batches:
                ev = EventBatch.from_sequences(*zip(*(self.split.valid[i] for i in b), strict=True)).to(model.device)
                pred, gate, sel, target = next_item_predictions(model, ev)
                T = ev.item.shape[1]
                start = torch.tensor([self.split.starts[i] for i in b], device=model.device)
                # prediction at position t is for the event at t + 1: keep targets in the validation part
                sel = sel & (torch.arange(1, T, device=model.device)[None, :] >= start[:, None])
                rows = self.memory.rows(b, T)[:, :-1][sel.cpu()]
                u, tgt = pred[sel], target[sel]
                gs = None if gate is None else gate[sel]
                for r0 in range(0, len(tgt), block):
                    r = slice(r0, r0 + block)
                    st = self.memory.state_at(rows[r], model.device)
                    base = model.explore_scores(u[r])
                    first = None
                    for key in settings:
                        model.rule, model.gate_shift = key
                        ranks = variant_ranks(model, st, u[r], base, tgt[r], reps=REPEATS if first is None else changed(key),
                                              gate_state=None if gs is None else gs[r])
                        if first is None:
                            first = ranks
                        ranks = {**first, **ranks}
                        for rep, by_excl in ranks.items():
                            for excl, rk in by_excl.items():
                                accs[key][variant_name(rep, excl)].add(rk)
                                parts[key][variant_name(rep, excl)].append(rk.cpu().numpy())
        finally:
            model.rule, model.gate_shift = own
            model.train(was_training)
        return {k: Validation({name: acc.summary(model.n_items) for name, acc in accs[k].items()},
                              {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in parts[k].items()})
                for k in settings}
