"""Training: sequences, queue-based length-bucketed mini-batches, sampled-negative losses.

Every neural model trains through its offline `forward_full` (the fast, parallel path); the repeat
head trains on the same positions with the recent-items memory replayed once by the shared update
function (`MemoryCache`), so training sees exactly the features the streaming step will compute.

The target at position t is the next event's item (t+1); unknown target items are skipped.
With the learned repeat path (ModelConfig.repeat = "mixture") the loss is the mixture's NLL with
the explore softmax over the full catalogue (`mixture_loss`; TrainConfig.loss is not used). With
"rule"/"none" the explore path trains on TrainConfig.loss with `negatives` items sampled
uniformly from the catalogue (shared by the batch).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from livemb.core.choices import LOSSES, VALID_METRICS
from livemb.core.errors import ConfigError, DataError
from livemb.core.progress import progress as progress_bar
from livemb.models import repeat
from livemb.models.base import EventBatch, SeqModel, event_type_index
from livemb.models.early_stop import (
    EMBEDDING_VARIANT,
    EpochJudge,
    Validation,
    Validator,
    best_beyond_noise,
    choose_rule,
    rule_report,
    split_validation,
)
from livemb.models.evaluation import DEFAULT_VARIANT
from livemb.models.grouping import group_by_user
from livemb.models.logits import explore_logz
from livemb.models.repeat import Variant
from livemb.models.replay import MemoryCache, Sequence, first_seen_ms, next_item_predictions
from livemb.models.slot_fit import prefit_slot_scorer

log = logging.getLogger(__name__)

# cut_ms -> (N+1, D) item vectors built from the events before cut_ms only (row 0 zeros), or None
# when they cannot be built (the model's own are used)
VectorsBefore = Callable[[int], np.ndarray | None]


@dataclass(frozen=True)
class TrainConfig:
    # 20 x 32: at the former 5 x 64 the models were far from converged (ML-100K, 400 users:
    # hiertcn recall@10 0.064 -> 0.100, gru 0.043 -> 0.112; docs/RESULTS.md). With early stopping
    # (valid_fraction > 0) `epochs` is the maximum.
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    loss: str = "hinge"  # explore-path loss for repeat modes "rule"/"none"; "mixture" trains its NLL
    margin: float = 1.0  # hinge delta
    negatives: int = 128
    max_len: int = 200  # events per training chunk (longer histories are split)
    seed: int = 0
    clip: float = 5.0
    # mixture NLL: exact log Z over the catalogue up to this many items; above it a sampled estimate
    # (`sampled_logz`: the target + `logz_samples` uniform items with the logQ correction), training
    # only: evaluation and serving always use the exact Z (docs/MODELS.md)
    exact_logz_max_items: int = 20_000
    logz_samples: int = 2048
    # early stopping (models/early_stop.py): the last valid_fraction of the TRAIN period's time range
    # is held out, `valid_metric` of the model's own ranking on it after each epoch, stop after
    # `patience` epochs without an improvement. 0 = a fixed `epochs` (the former behaviour).
    # Off (fixed epochs, logged) when epochs <= 1 or the held-out part has < valid_min_targets.
    valid_fraction: float = 0.1
    patience: int = 2
    patience_ratio: float = 0.5  # ... or this fraction of the best epoch's count when more (`patience`)
    # ... and never before this many optimizer steps: on a small log an epoch is a handful of steps
    # (taobao-dev: 14), and the held-out curve of the first few is the weight average warming up
    # and the gate settling, not a trend. There HierTCN --seed 2 stopped at epoch 4 on a dip
    # (served MRR 0.2527 -> 0.2506 over epochs 1-4) with its embedding alone at test recall@10
    # 0.038; run on, its curve rose from epoch 6 and peaked at 17 (embedding 0.199, served MRR
    # 0.2532 -> 0.2562, docs/RESULTS.md "Seeds"). Binds only where an epoch is a few steps: never
    # on the 1M-event log or YooChoose (>= 300 steps an epoch). 0 = patience alone.
    min_steps: int = 300
    valid_metric: str = "mrr"  # per-target 1/rank: a finer signal than a top-10 hit on a small held-out tail
    valid_max_targets: int = 5000  # a seeded random subset of the held-out users, whole users
    valid_min_targets: int = 200
    # an epoch improves on the best only by more than this many standard errors of the paired
    # per-target difference (early_stop.paired_gain): on a flat curve a +0.001 is noise, and chasing
    # it costs epochs on large logs; the same rule keeps the default variant unless another beats it.
    # 0 = any gain.
    valid_min_gain_se: float = 1.0
    # after choosing the epoch: True = retrain from the same initial weights on the whole train
    # period for that many epochs (the held-out tail is the most recent data: YooChoose recall@10
    # +0.010..0.014 over keeping, measured with an earlier model, docs/MODELS.md); False = keep the best
    # epoch's weights (trained without the tail; cheaper)
    refit: bool = True
    # the mixture's gate and repeat head learn only from targets the test and the stream can score:
    # a target that is its item's first occurrence in the log (a new item: outside any catalogue
    # built from the past) trains the explore path alone (models/train.mixture_loss). On taobao-dev
    # 69 % of the test's known targets are repeats against 24 % of all training targets; trained on
    # every target the gate learned the latter and its in-memory recall@10 fell from 0.62 to 0.43 by
    # epoch 10 (0.53 with this), docs/MODELS.md
    gate_on_known: bool = True
    # exponential moving average of the weights over optimizer steps (Polyak averaging): validation,
    # refit and the checkpoint use the averaged weights. 0 = off (the last step's weights). On
    # taobao-dev (14 steps an epoch) HierTCN's test recall@10 swung by up to 0.015 from one epoch to
    # the next without it; with 0.97 it stays within 0.397-0.404 from epoch 7 to 13 for two seeds.
    weight_average: float = 0.97
    # the rule's order inside the memory (models.repeat.RuleWeights) chosen from `RULE_GRID` on the
    # same held-out tail, for the counting models and every model's `rule` variant; False = the
    # default (by count, then recency). On taobao-dev the counting rules went from recall@10
    # 0.3644-0.3805 to 0.3832-0.4052 (docs/RESULTS.md): a baseline with a tuned rule is the fair one.
    choose_rule: bool = True
    # the mixture gate's serving-time shift (SeqModel.gate_shift) chosen from GATE_SHIFT_GRID on the
    # same held-out tail after every epoch; the epoch is judged by its served ranking under its shift,
    # and the embedding's clause then allows a served loss within the noise (early_stop.EpochJudge).
    # Why: trained on sequences its explore path has seen, the gate trusts that path more than unseen
    # data warrants, and the late epochs that train the published embedding cost the served ranking
    # (taobao-dev, 10 fixed epochs: test recall@10 0.4179 as trained, 0.4298 with the shift +2).
    # On taobao-dev it trains the embedding alone further for most seeds, not all (docs/RESULTS.md
    # "Seeds"). False = the gate as trained and the strict clause: fewer epochs (the six neural
    # models on the 1M-event log: 24 epochs without it, 45 with it, docs/RESULTS.md) and a weaker
    # embedding.
    calibrate_gate: bool = True
    # the mixture's slot scorer is first fitted alone (models/slot_fit.py): listwise cross-entropy
    # over the memory's slots, `slot_prefit_steps` Adam steps of `slot_prefit_batch` targets at
    # `slot_prefit_lr`; 0 = off (the slot scorer learns only inside the mixture's NLL)
    slot_prefit_steps: int = 500
    slot_prefit_lr: float = 1e-2
    slot_prefit_batch: int = 512

    def __post_init__(self):
        if self.min_steps < 0:
            raise ConfigError(f"min_steps must be >= 0 (0: patience alone), got {self.min_steps}")
        if self.slot_prefit_steps < 0 or self.slot_prefit_batch < 1 or not self.slot_prefit_lr > 0:
            raise ConfigError("the slot scorer's pre-fit needs steps >= 0 (0: off), a batch >= 1 and a learning rate "
                              f"> 0, got {self.slot_prefit_steps}, {self.slot_prefit_batch}, {self.slot_prefit_lr}")




def sequences_from_frame(df, table) -> dict[str, Sequence]:
    """Per-user (items, etypes, ts) arrays in time order from an event-log frame and an ItemTable."""
    items = table.lookup(df["item_id"].to_numpy())
    etypes = event_type_index(df["event_type"].to_numpy())
    ts = df["ts"].to_numpy(np.int64)
    users, groups = group_by_user(df["user_id"].to_numpy())
    out = {}
    for k in np.argsort(users, kind="stable"):  # users in sorted order (training batches depend on it)
        idx = groups[k]
        out[str(users[k])] = (items[idx], etypes[idx], ts[idx])
    return out


def make_chunks(seqs: list[Sequence], max_len: int) -> list[Sequence]:
    """Split long histories into chunks of <= max_len events (from the end, so recent ones stay whole)."""
    chunks = []
    for it, et, ts in seqs:
        n = len(it)
        for end in range(n, 0, -max_len):
            start = max(0, end - max_len)
            if end - start >= 2:  # need at least one (input, target) pair
                chunks.append((it[start:end], et[start:end], ts[start:end]))
    return chunks


def bucketed_batches(chunks: list[Sequence], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Queue-based mini-batches (HierTCN slides): sort by length so a batch pads little, then shuffle batches."""
    lengths = np.fromiter((len(c[0]) for c in chunks), np.int64, len(chunks))
    order = np.argsort(lengths + rng.random(len(lengths)), kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def sampled_logz(model: SeqModel, u_t: Tensor, tgt: Tensor, k: int, gen: torch.Generator,
                 pos: Tensor | None = None) -> Tensor:
    """Sampled estimate of log Z = log sum_i exp <u, x_i> over the catalogue, (n,): the target's term
    `pos` (n,) (<u, x_target>, computed when None) plus k items drawn uniformly without replacement
    (shared by the batch), each standing for N/k items (the logQ correction of the sampled softmax;
    a sample equal to the target is left out). Fused product and backward: models/logits.py."""
    N = model.n_items
    k = min(k, N)
    dev = u_t.device
    neg_items = torch.randperm(N, generator=gen)[:k].to(dev) + 1  # (k,)
    col_of = torch.full((N + 1,), -1, dtype=torch.int64, device=dev)
    col_of[neg_items] = torch.arange(k, device=dev)
    col = col_of[tgt]  # (n,) the target's column among the samples, -1 if not drawn
    rows = (col >= 0).nonzero().squeeze(1)
    neg_logz, _ = explore_logz(u_t, model.item_vecs[neg_items], log_weight=math.log(N / k), drop=(rows, col[rows]))
    if pos is None:
        pos = (u_t * model.item_vecs[tgt]).sum(-1)
    return torch.logaddexp(pos, neg_logz)


def slot_explore(pred: Tensor, items: Tensor, item_vecs: Tensor, sel: Tensor, mem_seq: Tensor) -> tuple[Tensor, Tensor]:
    """Explore scores <u_t, x> of every memory slot and of every target, from one batched product.

    A training chunk's memory starts empty, so a slot's item is the chunk's own event at the slot's
    last touch (mem_seq is the position in the chunk): scoring each prediction against the chunk's
    T item vectors (one (B, T-1, T) bmm) and picking columns replaces the (n, M, D) gather of the
    memory's vectors, the largest cost of a sampled-Z epoch. Equal up to float rounding (tested).
    pred (B, T-1, D), items (B, T), sel (B, T-1), mem_seq (n, M) -> slots (n, M), targets (n,)."""
    B, T = items.shape
    s = torch.bmm(pred, item_vecs[items].transpose(1, 2))[sel]  # (n, T): against every chunk event
    pos = torch.arange(1, T, device=items.device).expand(B, T - 1)[sel]  # (n,) the target's position
    return s.gather(1, mem_seq.long().clamp(min=0)), s.gather(1, pos[:, None]).squeeze(1)


def mixture_loss(model: SeqModel, ev: EventBatch, memory: MemoryCache, rows: Tensor,
                 cfg: TrainConfig | None = None, gen: torch.Generator | None = None,
                 first_seen: Tensor | None = None) -> tuple[Tensor, int]:
    """Mean NLL of the next item under the repeat/explore mixture, explore softmax over the full
    catalogue (exact log Z: both paths are calibrated against each other), or, for catalogues above
    cfg.exact_logz_max_items, with the sampled estimate of log Z (`sampled_logz`).
    rows (B, T): MemoryCache rows."""
    cfg = cfg or TrainConfig()
    pred, gate, sel, target = next_item_predictions(model, ev)
    n = int(sel.sum())
    if n == 0:
        return pred.sum() * 0.0, 0
    u_t, tgt = pred[sel], target[sel]  # (n, D), (n,)
    ts_t = ev.ts[:, 1:][sel]  # (n,) the targets' times
    # memory after event t, (n, M') with M' = the batch's last filled slot (empty ones add nothing)
    st = repeat.trim_empty_slots(memory.state_at(rows[:, :-1][sel.cpu()], model.device))
    gs = None if gate is None else gate[sel]
    if model.n_items <= cfg.exact_logz_max_items:
        # the full catalogue (item i in column i - 1): log Z and the scores of the slots and the target
        pick = torch.cat([(st["mem_item"].long() - 1).clamp(min=0), (tgt - 1)[:, None]], dim=1)  # (n, M' + 1)
        logz, picked = explore_logz(u_t, model.item_vecs[1:], pick)
        explore_mem, explore_t = picked[:, :-1], picked[:, -1]
        shift, mem = model.memory_scores(st, u_t, "mixture", logz, gs, explore_mem=explore_mem)
    else:
        if gen is None:
            gen = torch.Generator().manual_seed(cfg.seed)
        explore_mem, explore_t = slot_explore(pred, ev.item, model.item_vecs, sel, st["mem_seq"])
        logz = sampled_logz(model, u_t, tgt, cfg.logz_samples, gen, pos=explore_t)
        shift, mem = model.memory_scores(st, u_t, "mixture", logz, gs, explore_mem=explore_mem)
    in_mem = st["mem_item"].long() == tgt[:, None]  # (n, M'): at most one slot (slots hold distinct items)
    explore_lp = explore_t + shift
    mem_lp = mem.gather(1, in_mem.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    logp = torch.where(in_mem.any(dim=1), mem_lp, explore_lp)
    if first_seen is not None:
        # a cold target (its item's first occurrence) is never scored by the test or the stream:
        # it trains the explore path alone (log-softmax over the catalogue), not the gate, which
        # then learns P(repeat | the next item is a catalogue item), the probability serving needs
        cold = first_seen[tgt] >= ts_t
        logp = torch.where(cold, explore_t - logz, logp)
    return -logp.mean(), n


def batch_loss(model: SeqModel, ev: EventBatch, cfg: TrainConfig, gen: torch.Generator) -> tuple[Tensor, int]:
    """Sampled-negative loss of the explore path (repeat modes "rule"/"none": nothing to learn there)."""
    pred, _, sel, target = next_item_predictions(model, ev)
    n = int(sel.sum())
    if n == 0:
        return pred.sum() * 0.0, 0
    u_t = pred[sel]  # (n, D)
    tgt = target[sel]  # (n,)
    x_t = model.item_vecs[tgt]
    if cfg.loss == "l2":
        return ((u_t - x_t) ** 2).sum(-1).mean(), n
    pos = (u_t * x_t).sum(-1)  # (n,)
    neg_items = torch.randint(1, model.n_items + 1, (cfg.negatives,), generator=gen).to(pred.device)
    neg = u_t @ model.item_vecs[neg_items].T  # (n, K)
    neg = neg.masked_fill(neg_items[None, :] == tgt[:, None], -math.inf)
    valid = ~torch.isneginf(neg)  # -inf marks masked entries; a NaN must propagate, not vanish
    # each uniform sample stands for N/K catalogue items: the logQ correction of the sampled softmax
    if cfg.loss == "ce":
        logits = torch.cat([pos[:, None], neg + math.log(model.n_items / cfg.negatives)], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device)), n
    diff = neg - pos[:, None]
    if cfg.loss == "hinge":
        per = F.relu(cfg.margin + diff)
    elif cfg.loss == "bpr":
        per = F.softplus(diff)  # -log sigmoid(pos - neg)
    elif cfg.loss == "nce":
        per = F.softplus(neg) + F.softplus(-pos)[:, None]
    else:
        raise ConfigError(f"unknown loss {cfg.loss!r}; choose from {LOSSES}")
    w = valid.to(per.dtype)
    per = torch.where(valid, per, torch.zeros_like(per))
    return ((per * w).sum(1) / w.sum(1).clamp(min=1e-9)).mean(), n


class WeightAverage:
    """EMA of parameters over optimizer steps: avg <- decay * avg + (1 - decay) * p after each step."""

    def __init__(self, params: list[Tensor], decay: float):
        self.params, self.decay = params, decay
        self.avg = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def load(self) -> None:
        for p, a in zip(self.params, self.avg, strict=True):
            p.copy_(a)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the model for the duration (validation), the trained ones after."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            self.load()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, live, strict=True):
                    p.copy_(w)


def _run_epochs(model: SeqModel, chunks: list[Sequence], cfg: TrainConfig, epochs: int, history: dict,
                on_epoch=None, tag: str = "", progress: bool = False) -> None:
    """Train `epochs` epochs from cfg.seed's random streams; on_epoch(epoch) -> True stops early."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    t_mem = time.perf_counter()
    memory = MemoryCache(model, chunks) if model.repeat_mode == "mixture" else None
    first_seen = first_seen_ms(chunks, model.n_items).to(model.device) if memory and cfg.gate_on_known else None
    history["memory_seconds"] = history.get("memory_seconds", 0.0) + time.perf_counter() - t_mem  # one-off replay
    if memory is not None and model.repeat_head is not None and cfg.slot_prefit_steps > 0:
        history["slot_prefit"] = prefit_slot_scorer(model.repeat_head, memory, chunks, cfg.slot_prefit_steps,
                                                    cfg.slot_prefit_lr, cfg.slot_prefit_batch, cfg.seed, model.device,
                                                    slot_features=model.slot_features)
    params = [p for p in model.parameters() if p.requires_grad]
    averaged = WeightAverage(params, cfg.weight_average) if cfg.weight_average > 0 else None
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, count, steps = 0.0, 0, 0
        batches = bucketed_batches(chunks, cfg.batch_size, rng)
        bar = progress_bar(batches, desc=f"{model.name}{tag} epoch {epoch + 1}/{epochs}", disable=not progress,
                           leave=False)
        for b in bar:
            ev = EventBatch.from_sequences(*zip(*(chunks[i] for i in b), strict=True)).to(model.device)
            if memory is not None:
                loss, n = mixture_loss(model, ev, memory, memory.rows(b, ev.item.shape[1]), cfg, gen, first_seen)
            else:
                loss, n = batch_loss(model, ev, cfg, gen)
            if n == 0:
                continue
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{model.name}: loss became {loss.item()} in epoch {epoch + 1}")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if averaged is not None:
                averaged.update()
            steps += 1
            total += loss.item() * n
            count += n
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        dt = time.perf_counter() - t0
        history["epoch_seconds"].append(dt)
        history.setdefault("epoch_steps", []).append(steps)
        history["loss"].append(total / max(count, 1))
        history["targets"] = count
        log.info("%s%s epoch %d/%d loss %.4f (%.1fs, %d targets, %.0f targets/s)", model.name, tag, epoch + 1, epochs,
                 history["loss"][-1], dt, count, count / max(dt, 1e-9))
        if on_epoch is not None:
            with averaged.swapped() if averaged is not None else contextlib.nullcontext():
                stop = on_epoch(epoch + 1)
            if stop:
                break
    if averaged is not None:
        averaged.load()  # the model leaves training with the averaged weights


def _early_stop_plan(seqs: list[Sequence], cfg: TrainConfig, choose_epochs: bool = True):
    """The validation split, or (None, reason) when training runs a fixed cfg.epochs.
    choose_epochs=False (a model with nothing to train: only its variant is chosen) ignores epochs."""
    if cfg.valid_fraction <= 0:
        return None, "valid_fraction = 0"
    if choose_epochs and cfg.epochs <= 1:
        return None, f"epochs = {cfg.epochs}: nothing to choose"
    split = split_validation(seqs, cfg.valid_fraction, cfg.valid_max_targets, cfg.seed)
    if split.targets < cfg.valid_min_targets or not make_chunks(split.fit, cfg.max_len):
        return None, (f"the last {cfg.valid_fraction:.0%} of the train period has {split.targets_total} validation "
                      f"targets (< valid_min_targets = {cfg.valid_min_targets})")
    return split, ""


def train_model(model: SeqModel, seqs: list[Sequence], cfg: TrainConfig, progress: bool = True,
                vectors_before: VectorsBefore | None = None) -> dict:
    """Train in place; returns {"epoch_seconds", "loss", "targets", "chosen_epoch", "early_stopping"}.

    With early stopping (cfg.valid_fraction > 0) the epoch count is chosen on the held-out tail of
    the train period (models/early_stop.py), then either the best epoch's weights are kept or the
    model is retrained on everything for that many epochs (cfg.refit). Refuses a NaN loss.

    vectors_before(cut_ms) -> (N+1, D): the item vectors rebuilt from the events before the held-out
    tail, aligned to the model's item indices, when the model's vectors were built from the same log.
    The choice of epoch and variant then runs on them, so the held-out tail is as unseen as the test
    period: vectors built over the tail carry its co-occurrences and popularity, and on taobao-dev
    the held-out curve kept rising for 18 epochs (recall@10 0.39 -> 0.50) while the test's fell
    after 8; on vectors from before the tail it flattens at epoch 8 as the test's does. The refit
    (and so the checkpoint) uses the model's own vectors; without refit nothing is swapped."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; choose from {LOSSES}")
    if cfg.valid_metric not in VALID_METRICS:
        raise ConfigError(f"unknown valid_metric {cfg.valid_metric!r}; choose from {VALID_METRICS}")
    history: dict = {"epoch_seconds": [], "loss": [], "targets": 0}
    if not model.trainable:
        _fit_counting(model, seqs, cfg, history, vectors_before)
        model.eval()
        return history
    chunks = make_chunks(seqs, cfg.max_len)
    if not chunks:
        raise DataError("no training sequence has two or more events")
    split, reason = _early_stop_plan(seqs, cfg)
    if split is None:
        if cfg.valid_fraction > 0:
            log.info("%s: early stopping off (%s); training a fixed %d epochs", model.name, reason, cfg.epochs)
        _run_epochs(model, chunks, cfg, cfg.epochs, history, progress=progress)
        history["chosen_epoch"] = cfg.epochs
        history["early_stopping"] = {"used": False, "reason": reason}
    else:
        _early_stopped(model, chunks, split, cfg, history, progress, vectors_before if cfg.refit else None)
        model.served = Variant.parse(history["served_variant"])
        log.info("%s: serves %s (the best variant on the held-out tail at the chosen epoch)", model.name,
                 model.served.name)
    model.eval()
    return history


@contextlib.contextmanager
def _item_vectors(model: SeqModel, vectors: np.ndarray | None):
    """The model's item vectors replaced by `vectors` for the duration (None: unchanged)."""
    if vectors is None:
        yield
        return
    own = model.item_vecs
    if tuple(vectors.shape) != tuple(own.shape):
        raise DataError(f"validation item vectors {tuple(vectors.shape)} do not match the model's {tuple(own.shape)}")
    model.item_vecs = torch.as_tensor(vectors, dtype=own.dtype, device=own.device)
    try:
        yield
    finally:
        model.item_vecs = own


def _fit_counting(model: SeqModel, seqs: list[Sequence], cfg: TrainConfig, history: dict,
                  vectors_before: VectorsBefore | None = None) -> None:
    """A model with nothing to train (counts, means) still serves a variant chosen from the data,
    as a trained one does: counted on the fit part, ranked on the held-out tail, then counted on
    everything. Raters never return to an item: `rule`/`rep` with nothing masked puts the items a
    user already rated first (MovieLens-100K: `last` 0.0167 recall@10 as rep+none, 0.1369 as
    rep+history)."""
    fit = getattr(model, "fit", None)
    split, reason = _early_stop_plan(seqs, cfg, choose_epochs=False)
    if split is not None:
        t0 = time.perf_counter()
        with _item_vectors(model, vectors_before(split.cut_ms) if vectors_before else None):
            if fit is not None:
                fit(split.fit)
            vals = Validator(model, split).by_rule(model, rule_grid(cfg, model))
        model.rule = choose_rule(vals, model.repeat_mode, cfg.valid_metric, cfg.valid_min_gain_se)
        val = vals[model.rule]
        history["served_variant"] = served_variant(val, cfg)
        model.served = Variant.parse(history["served_variant"])
        history["early_stopping"] = {"used": False, "reason": "nothing to train", "variant_chosen": True,
                                     "valid_targets": split.targets, "valid_seconds": time.perf_counter() - t0,
                                     "variants": {v: {"recall@10": x["recall@10"], "mrr": x["mrr"]}
                                                  for v, x in val.metrics.items()},
                                     "rule": rule_report(vals, model.rule, model.repeat_mode, cfg.valid_metric)}
        log.info("%s: serves %s (the best variant on the held-out tail), rule %s (%s)", model.name,
                 model.served.name, model.rule.name, "chosen there" if cfg.choose_rule else "--no-choose-rule")
    else:
        history["early_stopping"] = {"used": False, "reason": reason, "variant_chosen": False}
    if fit is not None:
        fit(seqs)


def rule_grid(cfg: TrainConfig, model: SeqModel) -> tuple[repeat.RuleWeights, ...]:
    """The rule weights the held-out tail chooses among (with a category term for a model that
    reads item categories)."""
    if not cfg.choose_rule:
        return (repeat.DEFAULT_RULE,)
    return repeat.RULE_GRID_CATEGORIES if model.cfg.item_categories else repeat.RULE_GRID


def served_variant(val: Validation, cfg: TrainConfig) -> str:
    """The variant to serve from a validation pass: the best by cfg.valid_metric, unless its gain
    over the default (the model's own repeat path, nothing masked) on the same targets is within
    `valid_min_gain_se` standard errors (`early_stop.best_beyond_noise`): then the default."""
    return best_beyond_noise({v: m[cfg.valid_metric] for v, m in val.metrics.items()},
                             lambda v: val.values(v, cfg.valid_metric), DEFAULT_VARIANT, cfg.valid_min_gain_se)


def gate_shifts(model: SeqModel, cfg: TrainConfig) -> tuple[float, ...]:
    """The gate shifts the held-out tail chooses among after each epoch (only 0 = the gate as trained
    unless cfg.calibrate_gate and the model has a learned gate)."""
    return repeat.GATE_SHIFT_GRID if cfg.calibrate_gate and model.repeat_head is not None else (0.0,)


def gate_shift_choice(vals: dict[float, Validation], cfg: TrainConfig) -> float:
    """The shift whose served variant ranks the held-out tail best, unless its gain over no shift
    on the same targets is within the noise (`best_beyond_noise`, as for the served variant)."""
    served = {s: served_variant(v, cfg) for s, v in vals.items()}
    return best_beyond_noise({s: vals[s].metrics[served[s]][cfg.valid_metric] for s in vals},
                             lambda s: vals[s].values(served[s], cfg.valid_metric), 0.0, cfg.valid_min_gain_se)


def patience(best_epoch: int, cfg: TrainConfig) -> int:
    """Epochs without a better one before training stops: cfg.patience, or half the best epoch's
    count when that is more (a curve still rising after 6 epochs gets 3 more to show it)."""
    return max(cfg.patience, math.ceil(cfg.patience_ratio * best_epoch))


def should_stop(epoch: int, best_epoch: int, steps: int, cfg: TrainConfig) -> bool:
    """After `epoch` epochs (`steps` optimizer steps in all), the best so far at `best_epoch`: stop
    when `patience` epochs brought nothing better and at least cfg.min_steps steps have run."""
    return epoch - best_epoch >= patience(best_epoch, cfg) and steps >= cfg.min_steps


def _early_stopped(model: SeqModel, chunks: list[Sequence], split, cfg: TrainConfig, history: dict,
                   progress: bool, vectors_before: VectorsBefore | None) -> None:
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    rebuilt = vectors_before(split.cut_ms) if vectors_before is not None else None  # None: could not be built
    with _item_vectors(model, rebuilt):
        _choose_epoch(model, split, cfg, history, progress, t0)
    history["early_stopping"]["item_vectors"] = "the model's own" if rebuilt is None else "rebuilt without the held-out tail"
    if cfg.refit:
        model.load_state_dict(init)
        history["fit_epoch_seconds"] = history["epoch_seconds"]
        history["fit_epoch_steps"] = history.pop("epoch_steps", [])
        history["epoch_seconds"] = []
        _run_epochs(model, chunks, cfg, history["chosen_epoch"], history, tag=" refit", progress=progress)
        log.info("%s: refit on the whole train period for the chosen %d epochs", model.name, history["chosen_epoch"])
    else:
        model.load_state_dict(history["best_weights"])
        log.info("%s: kept epoch %d's weights (valid %s %.4f)", model.name, history["chosen_epoch"], cfg.valid_metric,
                 history["early_stopping"]["best_value"])
    del history["best_weights"]


def _choose_epoch(model: SeqModel, split, cfg: TrainConfig, history: dict, progress: bool, t0: float) -> None:
    """Train on the fit part, validating after each epoch; sets chosen_epoch, served_variant,
    best_weights and early_stopping in `history`."""
    validator = Validator(model, split)
    log.info("%s: early stopping on %d validation targets (%d in the last %.0f%% of the train period), %s, "
             "patience %d, at least %d optimizer steps, at most %d epochs", model.name, split.targets,
             split.targets_total, 100 * cfg.valid_fraction, cfg.valid_metric, cfg.patience, cfg.min_steps, cfg.epochs)
    es = {"used": True, "metric": cfg.valid_metric, "valid_fraction": cfg.valid_fraction, "patience": cfg.patience,
          "min_steps": cfg.min_steps,
          "valid_targets": split.targets, "valid_targets_total": split.targets_total, "refit": cfg.refit,
          "min_gain_se": cfg.valid_min_gain_se,
          "valid": [], "valid_seconds": 0.0, "setup_seconds": time.perf_counter() - t0}
    best = {"value": -math.inf, "epoch": 0, "weights": None, "variant": DEFAULT_VARIANT, "gate_shift": 0.0}
    shifts = gate_shifts(model, cfg)
    # calibrated, the served ranking holds over the late epochs: a loss within the noise may buy the embedding
    judge = EpochJudge(cfg.valid_min_gain_se, allow_loss_se=cfg.valid_min_gain_se if len(shifts) > 1 else 0.0)

    def on_epoch(epoch: int) -> bool:
        t1 = time.perf_counter()
        vals = validator.by_gate_shift(model, shifts)
        shift = gate_shift_choice(vals, cfg) if len(vals) > 1 else shifts[0]
        val = vals[shift]
        es["valid_seconds"] += time.perf_counter() - t1
        # an epoch is worth the variant a checkpoint of it would serve (`served_variant`), and the
        # embedding it would publish (`EpochJudge`)
        variant = served_variant(val, cfg)
        m = val.metrics[variant]
        verdict = judge(val.values(variant, cfg.valid_metric), val.values(EMBEDDING_VARIANT, cfg.valid_metric))
        es["valid"].append({"epoch": epoch, "recall@10": m["recall@10"], "mrr": m["mrr"], "variant": variant,
                            "gate_shift": shift,
                            "gain": verdict.gain, "min_gain": verdict.min_gain, "chosen_by": verdict.by,
                            "variants": {v: {"recall@10": x["recall@10"], "mrr": x["mrr"]}
                                         for v, x in val.metrics.items()}})
        if verdict.chosen:
            best.update(value=m[cfg.valid_metric], epoch=epoch, variant=variant, gate_shift=shift,
                        weights={k: v.detach().clone() for k, v in model.state_dict().items()})
        log.info("%s epoch %d valid recall@10 %.4f mrr %.4f as %s%s (%s)", model.name, epoch, m["recall@10"], m["mrr"],
                 variant, f", gate shift {shift:g}" if len(shifts) > 1 else "", verdict.note)
        return should_stop(epoch, best["epoch"], sum(history["epoch_steps"]), cfg)

    fit_chunks = make_chunks(split.fit, cfg.max_len)
    _run_epochs(model, fit_chunks, cfg, cfg.epochs, history, on_epoch, progress=progress)
    # the rule's weights, at the chosen epoch's weights (they matter to the rule variants only, so
    # they are chosen once, not every epoch); the variant is chosen again under them
    t1 = time.perf_counter()
    model.load_state_dict(best["weights"])
    model.gate_shift = best["gate_shift"]  # kept through the refit (training ignores it) into the checkpoint
    vals = validator.by_rule(model, rule_grid(cfg, model))
    model.rule = choose_rule(vals, model.repeat_mode, cfg.valid_metric, cfg.valid_min_gain_se)
    best["variant"] = served_variant(vals[model.rule], cfg)
    es["rule"] = rule_report(vals, model.rule, model.repeat_mode, cfg.valid_metric)
    es["valid_seconds"] += time.perf_counter() - t1
    log.info("%s: rule %s (%s), serves %s at epoch %d", model.name, model.rule.name,
             "chosen on the held-out tail" if cfg.choose_rule else "--no-choose-rule", best["variant"], best["epoch"])
    es["epochs_run"] = len(es["valid"])
    es["best_value"] = best["value"]
    es["gate_shift"] = best["gate_shift"]
    history["chosen_epoch"] = best["epoch"]
    history["served_variant"] = best["variant"]
    history["best_weights"] = best["weights"]
    history["early_stopping"] = es
