"""The evaluation protocol of SPEC section 4, shared by every model.

Global temporal split; each model is trained (or counted) on the train part; at test time each
user's state is warmed on their train history through the streaming `step`, then every test event
is scored against the full catalogue BEFORE it is applied, exactly as the live service would.
One pass scores every variant (repeat path on/off x exclude_seen none/session/history).
Ties are pessimistic (models/metrics.ranks_of); targets without an item vector are skipped and
counted.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from core.progress import progress as progress_bar
from core.settings import EXCLUDE_SEEN
from models import MODEL_REGISTRY, EventBatch, ModelConfig, SeqModel, repeat
from models.metrics import RankAccumulator, ranks_of
from models.train import Sequence, TrainConfig, sequences_from_frame, train_model

log = logging.getLogger(__name__)

VARIANTS = [(rep, excl) for rep in (True, False) for excl in EXCLUDE_SEEN]
DEFAULT_VARIANT = "rep+none"


def variant_name(rep: bool, excl: str) -> str:
    return f"{'rep' if rep else 'norep'}+{excl}"


@torch.no_grad()
def evaluate_model(
    model: SeqModel, train: dict[str, Sequence], test: dict[str, Sequence], batch_users: int = 256, progress: bool = True
) -> dict:
    """Score every test event of every test user; returns {variant: metrics} plus skip counts."""
    model.eval()
    users = sorted(test)
    accs = {variant_name(r, e): RankAccumulator() for r, e in VARIANTS}
    # targets that open a new session: where the cross-session state has to earn its keep
    starts = RankAccumulator()
    gap = model.cfg.session_gap_ms
    skipped = 0
    empty = (np.zeros(0, np.int64),) * 3
    bar = progress_bar(total=sum(len(test[u][0]) for u in users), desc=f"eval {model.name}", disable=not progress, leave=False)
    for i in range(0, len(users), batch_users):
        group = users[i : i + batch_users]
        B = len(group)
        st = model.init_state(B)
        warm = [train.get(u, empty) for u in group]
        u = torch.zeros(B, model.cfg.dim, device=model.device)
        if any(len(w[0]) for w in warm):
            st, u = model.step(st, EventBatch.from_sequences(*zip(*warm, strict=True)).to(model.device))
        ev = EventBatch.from_sequences(*zip(*(test[g] for g in group), strict=True)).to(model.device)
        for t in range(ev.item.shape[1]):
            active = ev.mask[:, t]
            target = ev.item[:, t]
            scored = active & (target > 0)
            skipped += int((active & (target == 0)).sum())
            if scored.any():
                opens = (ev.ts[:, t] - st["last_ts"] > gap) | (st["last_ts"] < 0)
                u_next = model.next_session_embedding(st)
                # the serving side knows the request time, so a returning user gets the start embedding
                u_eval = u if u_next is None else torch.where(opens[:, None], u_next, u)
                for rep in (True, False):
                    scores = model.scores(st, u_eval, use_repeat=rep)
                    for excl in EXCLUDE_SEEN:
                        mask = repeat.seen_mask(st, scores.shape[1], excl)
                        r = ranks_of(scores[scored], target[scored], None if mask is None else mask[scored])
                        accs[variant_name(rep, excl)].add(r)
                        if rep and excl == "none":
                            starts.add(r[(opens & (st["last_ts"] >= 0))[scored]])
            st, u_new = model.step(st, ev.slice(t, t + 1))
            u = torch.where(active[:, None], u_new, u)
            bar.update(int(active.sum()))
    bar.close()
    out = {name: acc.summary(model.n_items) for name, acc in accs.items()}
    out["session_start"] = starts.summary(model.n_items)
    out["targets_skipped_unknown_item"] = skipped
    return out


def build_model(name: str, vectors: np.ndarray, **cfg_overrides) -> SeqModel:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODEL_REGISTRY)}")
    cfg = ModelConfig(name=name, dim=vectors.shape[1], **cfg_overrides)
    return MODEL_REGISTRY[name](cfg, vectors)


def run_evaluation(df, table, models: list[str], train_cfg: TrainConfig, test_frac: float = 0.2,
                   device: str = "cpu", model_overrides: dict | None = None, progress: bool = True) -> dict:
    """Split, train each model, evaluate; returns the SPEC section 9 JSON structure."""
    from tools.eventlog import temporal_split

    train_df, test_df = temporal_split(df, test_frac)
    train = sequences_from_frame(train_df, table)
    test = sequences_from_frame(test_df, table)
    vectors = table.padded_vectors()
    test_items = table.lookup(test_df["item_id"].to_numpy())
    results = {}
    for name in models:
        model = build_model(name, vectors, **(model_overrides or {})).to(device)
        t0 = time.perf_counter()
        hist = train_model(model, list(train.values()), train_cfg, progress=progress)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        variants = evaluate_model(model, train, test, progress=progress)
        skipped = variants.pop("targets_skipped_unknown_item")
        session_start = variants.pop("session_start")
        res = dict(variants[DEFAULT_VARIANT])
        res.update(train_seconds=round(train_seconds, 2), eval_seconds=round(time.perf_counter() - t1, 2),
                   epoch_seconds=[round(s, 2) for s in hist["epoch_seconds"]],
                   targets_skipped_unknown_item=skipped, session_start=session_start, variants=variants)
        results[name] = res
        log.info("%s: recall@10 %.4f mrr %.4f (train %.1fs)", name, res["recall@10"], res["mrr"], train_seconds)
    dataset = {
        "events": int(len(df)), "users": int(df["user_id"].nunique()), "items": int(len(table)),
        "train_events": int(len(train_df)), "test_events": int(len(test_df)),
        "test_targets_known": int((test_items > 0).sum()), "test_frac": test_frac,
        "default_variant": DEFAULT_VARIANT,
    }
    return {"dataset": dataset, "results": results}


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
