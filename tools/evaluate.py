"""The evaluation protocol of SPEC section 4, shared by every model.

Global temporal split; each model is trained (or counted) on the train part; at test time each
user's state is warmed on their train history through the streaming `step`, then every test event
is scored against the full catalogue BEFORE it is applied, exactly as the live service would.
One pass scores every variant: repeat path (the model's own = "rep", the fixed recent-first rule =
"rule", none = "norep") x exclude_seen (none/session/history).
Ties are pessimistic (models/metrics.ranks_of); targets without an item vector are skipped and
counted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError
from core.progress import progress as progress_bar
from core.settings import EXCLUDE_SEEN
from models import MODEL_REGISTRY, EventBatch, ModelConfig, SeqModel, repeat
from models.base import EVENT_TYPES, opens_session
from models.metrics import RankAccumulator, ranks_from_explore
from models.train import Sequence, TrainConfig, sequences_from_frame, train_model

log = logging.getLogger(__name__)

REPEATS = ("rep", "rule", "norep")  # the model's own repeat path, the fixed rule, none
REPEAT_MODE_OF = {"rule": "rule", "norep": "none"}  # "rep": the model's configured mode
EXCLUDES = EXCLUDE_SEEN
VARIANTS = [(rep, excl) for rep in REPEATS for excl in EXCLUDES]
DEFAULT_VARIANT = "rep+none"


def variant_name(rep: str, excl: str) -> str:
    return f"{rep}+{excl}"


def _take(st: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {key: v[:k] for key, v in st.items()}


def _put(st: dict[str, torch.Tensor], new: dict[str, torch.Tensor], k: int) -> None:
    for key, v in new.items():
        st[key][:k] = v


def warm_up(model: SeqModel, st: dict[str, torch.Tensor], seqs: list[Sequence]) -> tuple[dict, torch.Tensor]:
    """Step B users through their histories; per-step work is proportional to the users still
    active (rows are processed longest-first, so the active ones are a prefix)."""
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
    u_sorted = torch.zeros_like(u)
    step = 32  # events per call: fewer Python round trips, still close to the active count
    for t0 in range(0, ev.item.shape[1], step):
        k = int(active[t0])
        sub = EventBatch(*(x[:k, t0 : t0 + step] for x in (ev.item, ev.etype, ev.ts, ev.mask)))
        new, u_k = model.step(_take(st, k), sub)
        _put(st, new, k)
        u_sorted[:k] = torch.where(sub.mask.any(1)[:, None], u_k, u_sorted[:k])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(B, device=model.device)
    return {k: v[inv] for k, v in st.items()}, u_sorted[inv]


def variant_parts(model: SeqModel, st: dict[str, torch.Tensor], u: torch.Tensor, base: torch.Tensor,
                  mode: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift (B,), slot scores (B, M)) of repeat mode `mode` (None: the model's own) on top of the
    explore scores `base` (B, N+1): what `model.scores(st, u, mode)` would put outside / inside the
    memory. The learned mixture goes through `memory_scores` (the serving definition); the rule
    and "none" are the explore score plus the fixed bonus / nothing, for every model."""
    mode = model.repeat_mode if mode is None else mode
    mem_item = st["mem_item"].long()
    if mode == "mixture":
        logz = torch.logsumexp(base[:, 1:], dim=1)
        return model.memory_scores(st, u, "mixture", logz, explore_all=base)
    mem = base.gather(1, mem_item)
    if mode == "rule":
        mem = mem + repeat.heuristic_bonus(st).to(mem.dtype)
    return torch.zeros(base.shape[0], dtype=base.dtype, device=base.device), mem.masked_fill(mem_item <= 0, -math.inf)


@torch.no_grad()
def evaluate_model(
    model: SeqModel, train: dict[str, Sequence], test: dict[str, Sequence], batch_users: int = 256, progress: bool = True,
    group_types: tuple[dict[str, Sequence], dict[str, Sequence]] | None = None,
) -> dict:
    """Score every test event of every test user; returns {variant: metrics} plus skip counts.

    `after_event_type` groups the targets by the type of the event before them, read from
    `group_types` (train, test) when given (the real types while the model sees none), else from
    train/test themselves.

    Users are batched by test length (longest first, as training buckets by length) and, inside a
    batch, the users still active at step t are a prefix: every per-step tensor op runs on those
    rows only, so the work is proportional to the events, not to batch x longest history.
    """
    model.eval()
    users = sorted(test, key=lambda x: (-len(test[x][0]), x))
    accs = {variant_name(r, e): RankAccumulator() for r, e in VARIANTS}
    # targets that open a new session: where the cross-session state has to earn its keep
    starts = RankAccumulator()
    # targets by the type of the event just before them (a cart, a purchase, a view): the event-type signal
    after = {(rep, ty): RankAccumulator() for rep in REPEATS for ty in range(len(EVENT_TYPES))}
    # targets already in the memory (what a repeat path can reach) vs the rest (explore only)
    by_mem = {(rep, hit): RankAccumulator() for rep in REPEATS for hit in (True, False)}
    gap = model.cfg.session_gap_ms
    learned = model.repeat_mode == "mixture"  # otherwise "rep" is the fixed rule (or none) already
    skipped = 0
    in_memory = 0  # scored targets already in the recent-items memory (what a repeat path can reach)
    empty = (np.zeros(0, np.int64),) * 3
    total = sum(len(test[x][0]) for x in users)
    bar = progress_bar(total=total, desc=f"eval {model.name}", unit="ev", disable=not progress, leave=False)
    for i in range(0, len(users), batch_users):
        group = users[i : i + batch_users]
        st, u = warm_up(model, model.init_state(len(group)), [train.get(x, empty) for x in group])
        run = model.init_running(st) if getattr(model, "incremental", False) else None
        g_train, g_test = group_types or (train, test)
        prev_type = torch.tensor([int(g_train[g][1][-1]) if g in g_train and len(g_train[g][1]) else -1 for g in group],
                                 dtype=torch.int64, device=model.device)  # (B,) type of the last applied event
        ev = EventBatch.from_sequences(*zip(*(test[g] for g in group), strict=True)).to(model.device)
        ev_type = ev.etype if group_types is None else \
            EventBatch.from_sequences(*zip(*(g_test[g] for g in group), strict=True)).etype.to(model.device)
        n_active = ev.mask.sum(0).tolist()  # users sorted by test length: the active ones are a prefix
        for t in range(ev.item.shape[1]):
            k = n_active[t]
            sk = _take(st, k)
            target = ev.item[:k, t]
            scored = target > 0
            skipped += int((~scored).sum())
            if scored.any():
                hit = (sk["mem_item"][scored] == target[scored, None]).any(1)  # (k',)
                in_memory += int(hit.sum())
                opens = opens_session(ev.ts[:k, t], sk["last_ts"], gap)
                u_next = model.next_session_embedding(sk)
                # the serving side knows the request time, so a returning user gets the start embedding
                u_eval = u[:k] if u_next is None else torch.where(opens[:, None], u_next, u[:k])
                # exclude_seen only removes memory items and every variant differs from the explore
                # scores only by a per-row shift and the (k, M) slots: one (k, N) comparison of the
                # shared explore scores per variant, no merged (k, N+1) matrix (models.metrics)
                slots = {e: repeat.excluded_slots(sk, e)[scored] for e in EXCLUDES if e != "none"}
                extra = {} if run is None else {"running": run[:k]}
                base = model.scores(sk, u_eval, "none", **extra)  # explore only, shared by the variants
                sk_s = sk
                if not bool(scored.all()):  # (k, N+1) copy only when some target has no vector
                    base, sk_s, u_eval = base[scored], {key: v[scored] for key, v in sk.items()}, u_eval[scored]
                for rep in ("norep", "rep", "rule"):
                    if rep == "rule" and not learned:
                        continue
                    shift, mem = variant_parts(model, sk_s, u_eval, base, REPEAT_MODE_OF.get(rep))
                    ranks = ranks_from_explore(base, target[scored], sk_s["mem_item"], shift, mem, slots)
                    for excl in EXCLUDES:
                        accs[variant_name(rep, excl)].add(ranks[excl])
                        if rep == "rep" and not learned:
                            accs[variant_name("rule", excl)].add(ranks[excl])
                    ty = prev_type[:k][scored]
                    for r in (rep, "rule") if rep == "rep" and not learned else (rep,):
                        for j in ty.unique().tolist():
                            if j >= 0:
                                after[(r, j)].add(ranks["none"][ty == j])
                        by_mem[(r, True)].add(ranks["none"][hit])
                        by_mem[(r, False)].add(ranks["none"][~hit])
                    if rep == "rep":
                        starts.add(ranks["none"][(opens & (sk["last_ts"] >= 0))[scored]])
            new, u_new = model.step(sk, EventBatch(*(x[:k, t : t + 1] for x in (ev.item, ev.etype, ev.ts, ev.mask))))
            _put(st, new, k)
            u[:k] = u_new
            prev_type[:k] = ev_type[:k, t]
            if run is not None:
                model.update_running(run[:k], ev.item[:k, t])
            bar.update(k)
    bar.close()
    out = {name: acc.summary(model.n_items) for name, acc in accs.items()}
    out["session_start"] = starts.summary(model.n_items)
    out["by_memory"] = {variant_name(rep, "none"): {"in_memory": by_mem[(rep, True)].summary(model.n_items),
                                                     "not_in_memory": by_mem[(rep, False)].summary(model.n_items)}
                        for rep in REPEATS}
    out["after_event_type"] = {variant_name(rep, "none"): {EVENT_TYPES[ty]: after[(rep, ty)].summary(model.n_items)
                                                           for ty in range(len(EVENT_TYPES)) if after[(rep, ty)].n}
                               for rep in REPEATS}
    out["targets_skipped_unknown_item"] = skipped
    out["targets_in_memory"] = in_memory
    return out


def build_model(name: str, vectors: np.ndarray, **cfg_overrides) -> SeqModel:
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(MODEL_REGISTRY)}")
    cfg = ModelConfig(name=name, dim=vectors.shape[1], **cfg_overrides)
    return MODEL_REGISTRY[name](cfg, vectors)


def _as_views(seqs: dict[str, Sequence]) -> dict[str, Sequence]:
    view = EVENT_TYPES.index("view")
    return {u: (it, np.full_like(et, view), ts) for u, (it, et, ts) in seqs.items()}


def run_evaluation(df, table, models: list[str], train_cfg: TrainConfig, test_frac: float = 0.2,
                   device: str = "cpu", model_overrides: dict | None = None, progress: bool = True,
                   drop_event_types: bool = False) -> dict:
    """Split, train each model, evaluate; returns the SPEC section 9 JSON structure.
    drop_event_types: the models train and run as if every event were a view (what the type signal
    is worth); `after_event_type` still groups the targets by their real previous type."""
    from tools.eventlog import temporal_split

    train_df, test_df = temporal_split(df, test_frac)
    train = sequences_from_frame(train_df, table)
    test = sequences_from_frame(test_df, table)
    group_types = None
    if drop_event_types:
        group_types = (train, test)
        train, test = _as_views(train), _as_views(test)
    vectors = table.padded_vectors()
    test_items = table.lookup(test_df["item_id"].to_numpy())
    results = {}
    for name in models:
        torch.manual_seed(train_cfg.seed)  # the initial weights depend on the seed only, not on the models before
        model = build_model(name, vectors, **(model_overrides or {})).to(device)
        t0 = time.perf_counter()
        hist = train_model(model, list(train.values()), train_cfg, progress=progress)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        variants = evaluate_model(model, train, test, progress=progress, group_types=group_types)
        skipped = variants.pop("targets_skipped_unknown_item")
        in_memory = variants.pop("targets_in_memory")
        session_start = variants.pop("session_start")
        after_type = variants.pop("after_event_type")
        by_memory = variants.pop("by_memory")
        res = dict(variants[DEFAULT_VARIANT])
        res.update(train_seconds=round(train_seconds, 2), eval_seconds=round(time.perf_counter() - t1, 2),
                   epoch_seconds=[round(s, 2) for s in hist["epoch_seconds"]],
                   chosen_epoch=hist.get("chosen_epoch"), early_stopping=hist.get("early_stopping"),
                   fit_epoch_seconds=[round(s, 2) for s in hist.get("fit_epoch_seconds", [])],
                   targets_skipped_unknown_item=skipped, session_start=session_start, variants=variants,
                   after_event_type=after_type, by_memory=by_memory,
                   memory_hit_rate=round(in_memory / max(res["events_scored"], 1), 4))
        results[name] = res
        log.info("%s: recall@10 %.4f mrr %.4f (%s, eval %.1fs)", name, res["recall@10"], res["mrr"],
                 _training_summary(hist, train_seconds), res["eval_seconds"])
    dataset = {
        "events": int(len(df)), "users": int(df["user_id"].nunique()), "items": int(len(table)),
        "train_events": int(len(train_df)), "test_events": int(len(test_df)),
        "test_targets_known": int((test_items > 0).sum()), "test_frac": test_frac,
        "default_variant": DEFAULT_VARIANT, "event_types_dropped": drop_event_types,
    }
    return {"dataset": dataset, "results": results}


def epochs_text(res: dict) -> str | None:
    """'4 epochs (early stopping chose 1 of 3, refit)', '2 epochs', or None for a model that does not
    train; `res` is a training history or an evaluation result (the same keys)."""
    fit, final = res.get("fit_epoch_seconds") or [], res.get("epoch_seconds") or []
    if not fit and not final:
        return None
    es = res.get("early_stopping") or {}
    text = f"{len(fit) + len(final)} epochs"
    if es.get("used"):
        text += f" (early stopping chose {res['chosen_epoch']} of {es['epochs_run']}{', refit' if fit else ''})"
    return text


def _training_summary(hist: dict, seconds: float) -> str:
    """'train 12.3s, 4 epochs (early stopping chose 1 of 3, refit)' or 'no training' (counting models)."""
    epochs = epochs_text(hist)
    return "no training" if epochs is None else f"train {seconds:.1f}s, {epochs}"


METRIC_COLUMNS = ["recall@1", "recall@5", "recall@10", "recall@20", "mrr", "mrp"]


def markdown_table(report: dict, variant: str = DEFAULT_VARIANT) -> str:
    rows = ["| model | " + " | ".join(METRIC_COLUMNS) + " | train s | best variant (recall@10) |",
            "|---" * (len(METRIC_COLUMNS) + 3) + "|"]
    for name, res in report["results"].items():
        m = res["variants"][variant]
        best = max(res["variants"], key=lambda v: res["variants"][v]["recall@10"])
        rows.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in METRIC_COLUMNS)
                    + f" | {res['train_seconds']:.1f} | {best} {res['variants'][best]['recall@10']:.4f} |")
    return "\n".join(rows)


def variants_table(report: dict, metric: str = "recall@10") -> str:
    names = [variant_name(r, e) for r, e in VARIANTS]
    rows = [f"| model ({metric}) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, res in report["results"].items():
        rows.append(f"| {name} | " + " | ".join(f"{res['variants'][v][metric]:.4f}" for v in names) + " |")
    return "\n".join(rows)


def session_start_table(report: dict) -> str:
    rows = ["| model | recall@10 (session-start targets) | mrr | targets |", "|---|---|---|---|"]
    for name, res in report["results"].items():
        m = res["session_start"]
        rows.append(f"| {name} | {m['recall@10']:.4f} | {m['mrr']:.4f} | {m['events_scored']} |")
    return "\n".join(rows)


def event_type_table(report: dict, metric: str = "recall@10", variant: str = DEFAULT_VARIANT) -> str:
    """metric (targets) of each model on the targets right after a view / cart / purchase / ... event."""
    types = [t for t in EVENT_TYPES if any(t in r.get("after_event_type", {}).get(variant, {})
                                           for r in report["results"].values())]
    rows = [f"| model ({variant}, {metric}) | " + " | ".join(f"after {t}" for t in types) + " |", "|---" * (len(types) + 1) + "|"]
    for name, res in report["results"].items():
        by = res.get("after_event_type", {}).get(variant, {})
        cells = [f"{by[t][metric]:.4f} ({by[t]['events_scored']})" if t in by else "–" for t in types]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def memory_split_table(report: dict, metric: str = "recall@10") -> str:
    """metric of each model's variants on the targets already in the memory vs the others."""
    rows = [f"| model ({metric}, exclude none) | rep: in memory | rep: not in memory | rule: in memory | rule: not in memory"
            " | norep: in memory | norep: not in memory |", "|---" * 7 + "|"]
    for name, res in report["results"].items():
        by = res.get("by_memory")
        if not by:
            continue
        cells = [f"{by[f'{r}+none'][h][metric]:.4f} ({by[f'{r}+none'][h]['events_scored']})"
                 for r in REPEATS for h in ("in_memory", "not_in_memory")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def early_stopping_table(report: dict) -> str:
    """Per trained model: the chosen epoch, the epochs run and the validation curve (or why it was off)."""
    rows = ["| model | chosen epoch | epochs run | valid targets | valid recall@10 by epoch (best in bold) | refit |",
            "|---|---|---|---|---|---|"]
    for name, res in report["results"].items():
        es = res.get("early_stopping")
        if not es:
            continue
        if not es.get("used"):
            rows.append(f"| {name} | {res.get('chosen_epoch')} (fixed) | {len(res['epoch_seconds'])} | – | off: {es['reason']} | – |")
            continue
        curve = ", ".join(f"**{v['recall@10']:.4f}**" if v["epoch"] == res["chosen_epoch"] else f"{v['recall@10']:.4f}"
                          for v in es["valid"])
        rows.append(f"| {name} | {res['chosen_epoch']} | {es['epochs_run']} | {es['valid_targets']} | {curve} | "
                    f"{'yes' if es['refit'] else 'no'} |")
    return "\n".join(rows)


def write_outputs(report: dict, json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(report["results"])
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        x = np.arange(len(names))
        for j, metric in enumerate(["recall@10", "mrr"]):
            ax = axes[j]
            for k, (var, off) in enumerate([("rep+none", -0.2), ("norep+none", 0.0), ("rep+history", 0.2)]):
                vals = [report["results"][n]["variants"][var][metric] for n in names]
                ax.bar(x + off, vals, width=0.2, label=var, color=f"C{k}")
            ax.set_xticks(x, names, rotation=45, ha="right")
            ax.set_title(metric)
            ax.legend(fontsize=8)
        fig.suptitle(f"livemb evaluate: {report['dataset']['events']} events, {report['dataset']['items']} items")
        fig.tight_layout()
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
