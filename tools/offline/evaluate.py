"""`livemb evaluate`: split a log, train each model, run the protocol of models/evaluation.py, report.

Global temporal split (SPEC section 4); each model is trained (or counted) on the train part and
evaluated on the test part; the report is the SPEC section 9 JSON plus markdown tables and a plot.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from livemb.core.extras import require
from livemb.models.base import EVENT_TYPES
from livemb.models.evaluation import DEFAULT_VARIANT, REPEATS, VARIANTS, build_model, evaluate_model, variant_name
from livemb.models.newitems import key_sequences
from livemb.models.newvectors import EVAL_STEP_MS, Timeline, log_timeline
from livemb.models.repeat import Variant
from livemb.models.replay import Sequence
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.tools.data.eventlog import temporal_split
from livemb.tools.data.item_embeddings import vectors_before

log = logging.getLogger(__name__)


def _as_views(seqs: dict[str, Sequence]) -> dict[str, Sequence]:
    view = EVENT_TYPES.index("view")
    return {u: (it, np.full_like(et, view), ts) for u, (it, et, ts) in seqs.items()}


def run_evaluation(df, table, models: list[str], train_cfg: TrainConfig, test_frac: float = 0.2,
                   device: str = "cpu", model_overrides: dict | None = None, progress: bool = True,
                   drop_event_types: bool = False, repeat_path: str | None = None,
                   exclude_seen: str | None = None, item_vectors_kind: str | None = None,
                   open_catalogue: bool = False, new_vectors: dict | None = None) -> dict:
    """Split, train each model, evaluate; returns the SPEC section 9 JSON structure.
    Each model's headline figures are those of the variant it serves (chosen from its training
    data, `SeqModel.served`); `repeat_path` / `exclude_seen` override its parts, as on the worker.
    drop_event_types: the models train and run as if every event were a view (what the type signal
    is worth); `after_event_type` still groups the targets by their real previous type.
    item_vectors_kind: `table` was built from this log's train part with this kind, so early
    stopping chooses on vectors rebuilt without its held-out tail (tools.data.item_embeddings.vectors_before).
    open_catalogue: the test phase also ranks with the new-item pool of the live worker
    (models/newitems.py); each result gains "open_catalogue" (its served-variant figures, the
    all-events ones included, and how many targets were new items / in the user's pool).
    new_vectors (with open_catalogue): {window, cap, min_evidence} of the new-item extension
    (models/newvectors.py); each result gains "open_catalogue_vectors", the same figures with the
    pool and the extension, and how many targets the extension ranked."""
    train_df, test_df = temporal_split(df, test_frac)
    train = sequences_from_frame(train_df, table)
    test = sequences_from_frame(test_df, table)
    group_types = None
    if drop_event_types:
        group_types = (train, test)
        train, test = _as_views(train), _as_views(test)
    vectors = table.padded_vectors()
    before = vectors_before(train_df, table, item_vectors_kind) if item_vectors_kind else None
    test_items = table.lookup(test_df["item_id"].to_numpy())
    open_keys = (key_sequences(train_df, table), key_sequences(test_df, table)) if open_catalogue else None
    results = {}
    for name in models:
        torch.manual_seed(train_cfg.seed)  # the initial weights depend on the seed only, not on the models before
        model = build_model(name, vectors, table.category_codes(), **(model_overrides or {})).to(device)
        t0 = time.perf_counter()
        hist = train_model(model, list(train.values()), train_cfg, progress=progress, vectors_before=before)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        timeline = None
        if open_keys is not None and new_vectors is not None:
            timeline = _timeline(train, test, open_keys, vectors, model.cfg.session_gap_ms, new_vectors)
        variants = evaluate_model(model, train, test, progress=progress, group_types=group_types, open_keys=open_keys,
                                  new_vectors=timeline)
        opened = variants.pop("open_catalogue", None)
        vectored = variants.pop("open_catalogue_vectors", None)
        skipped = variants.pop("targets_skipped_unknown_item")
        in_memory = variants.pop("targets_in_memory")
        for key in ("targets_new_item", "targets_new_item_in_pool", "targets_new_item_in_index", "via_index"):
            variants.pop(key)
        session_start = variants.pop("session_start")
        after_type = variants.pop("after_event_type")
        by_memory = variants.pop("by_memory")
        served = Variant(repeat_path or model.served.repeat, exclude_seen or model.served.exclude_seen).name
        res = dict(variants[served])
        res.update(served_variant=served, train_seconds=round(train_seconds, 2), eval_seconds=round(time.perf_counter() - t1, 2),
                   epoch_seconds=[round(s, 2) for s in hist["epoch_seconds"]],
                   chosen_epoch=hist.get("chosen_epoch"), early_stopping=hist.get("early_stopping"),
                   fit_epoch_seconds=[round(s, 2) for s in hist.get("fit_epoch_seconds", [])],
                   targets_skipped_unknown_item=skipped, session_start=session_start, variants=variants,
                   after_event_type=after_type, by_memory=by_memory,
                   memory_hit_rate=round(in_memory / max(res["events_scored"], 1), 4))
        if opened is not None:
            res["open_catalogue"] = _open_summary(opened, served, len(test_df))
            log.info("%s open catalogue: %.4f / %.4f on all events, %d of %d targets new items (%d in the pool)", name,
                     opened[served]["all_events"]["recall@10"], opened[served]["all_events"]["mrr"],
                     opened["targets_new_item"], len(test_df), opened["targets_new_item_in_pool"])
        if vectored is not None:
            res["open_catalogue_vectors"] = _open_summary(vectored, served, len(test_df))
            ext = timeline.evidence
            res["open_catalogue_vectors"].update(
                targets_new_item_in_index=vectored["targets_new_item_in_index"],
                share_new_item_in_index=round(vectored["targets_new_item_in_index"] / max(len(test_df), 1), 4),
                via_index=vectored["via_index"][variant_name(Variant.parse(served).repeat, "none")],
                extension={"new_items_with_evidence": len(ext), "new_items_with_vector": len(ext.admitted()[0]),
                           "pairs": ext.applied, "evicted": ext.evicted, **new_vectors, "step_ms": EVAL_STEP_MS})
            log.info("%s open catalogue + vectors: %.4f / %.4f on all events, %d targets ranked through the extension",
                     name, vectored[served]["all_events"]["recall@10"], vectored[served]["all_events"]["mrr"],
                     vectored["targets_new_item_in_index"])
        results[name] = res
        log.info("%s (serves %s): recall@10 %.4f mrr %.4f on known targets, %.4f / %.4f on all events (%s, eval %.1fs)",
                 name, served, res["recall@10"], res["mrr"], res["all_events"]["recall@10"], res["all_events"]["mrr"],
                 _training_summary(hist, train_seconds), res["eval_seconds"])
    dataset = {
        "events": int(len(df)), "users": int(df["user_id"].nunique()), "items": int(len(table)),
        "train_events": int(len(train_df)), "test_events": int(len(test_df)),
        "test_targets_known": int((test_items > 0).sum()), "test_frac": test_frac,
        "default_variant": "each model's served variant (results.<model>.served_variant)",
        "variant_overrides": {"repeat_path": repeat_path, "exclude_seen": exclude_seen},
        "event_types_dropped": drop_event_types,
        "open_catalogue": open_catalogue,
    }
    return {"dataset": dataset, "results": results}


def _timeline(train: dict[str, Sequence], test: dict[str, Sequence], keys: tuple[dict, dict], vectors: np.ndarray,
              gap_ms: int, cfg: dict) -> Timeline:
    """The new-item extension over the whole log (train then test per user), snapshots at the
    `EVAL_STEP_MS` boundaries of the test targets' times."""
    empty = (np.zeros(0, np.int64),) * 3
    seqs, ks = {}, {}
    for user in set(train) | set(test):
        a, b = train.get(user, empty), test.get(user, empty)
        seqs[user] = tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))
        ks[user] = np.concatenate([keys[0].get(user, np.zeros(len(a[0]), np.int64)),
                                   keys[1].get(user, np.zeros(len(b[0]), np.int64))])
    query = np.concatenate([s[2] for s in test.values()]) if test else np.zeros(0, np.int64)
    return log_timeline(seqs, ks, vectors, query, gap_ms=gap_ms, step_ms=EVAL_STEP_MS, **cfg)


def _open_summary(opened: dict, served: str, test_events: int) -> dict:
    """The open-catalogue ranking of one model: its served variant's figures (scored targets and
    all events), the new-item target counts and every variant's all-events figures."""
    out = dict(opened[served])
    new = opened["targets_new_item"]
    out.update(targets_new_item=new, targets_new_item_in_pool=opened["targets_new_item_in_pool"],
               share_new_item=round(new / max(test_events, 1), 4),
               share_new_item_in_pool=round(opened["targets_new_item_in_pool"] / max(test_events, 1), 4),
               targets_skipped_unknown_item=opened["targets_skipped_unknown_item"],
               variants_all_events={v: opened[v]["all_events"] for v in (variant_name(r, e) for r, e in VARIANTS)})
    return out


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


def markdown_table(report: dict, variant: str | None = None) -> str:
    """One row per model: `variant` (default: the variant each model serves) on the known targets,
    then recall@10 / MRR over all test events (an unknown item is a miss)."""
    rows = ["| model | served | " + " | ".join(METRIC_COLUMNS) + " | all events: recall@10 | all events: mrr | train s"
            " | best variant (recall@10) |", "|---" * (len(METRIC_COLUMNS) + 6) + "|"]
    for name, res in report["results"].items():
        v = variant or res.get("served_variant", DEFAULT_VARIANT)
        m = res["variants"][v]
        best = max(res["variants"], key=lambda x: res["variants"][x]["recall@10"])
        rows.append(f"| {name} | {v} | " + " | ".join(f"{m[c]:.4f}" for c in METRIC_COLUMNS)
                    + f" | {m['all_events']['recall@10']:.4f} | {m['all_events']['mrr']:.4f}"
                    + f" | {res['train_seconds']:.1f} | {best} {res['variants'][best]['recall@10']:.4f} |")
    return "\n".join(rows)


def open_catalogue_table(report: dict) -> str:
    """All-events recall@10 / MRR of each model's served variant without and with the open
    catalogue's new-item pool, and the share of test targets that were new items."""
    rows = ["| model | served | all events: recall@10 | mrr | open catalogue: recall@10 | mrr | new-item targets "
            "| in the user's pool |", "|---" * 8 + "|"]
    for name, res in report["results"].items():
        o = res.get("open_catalogue")
        if o is None:
            continue
        c = res["variants"][res["served_variant"]]["all_events"]
        rows.append(f"| {name} | {res['served_variant']} | {c['recall@10']:.4f} | {c['mrr']:.4f} "
                    f"| {o['all_events']['recall@10']:.4f} | {o['all_events']['mrr']:.4f} "
                    f"| {o['share_new_item']:.1%} | {o['share_new_item_in_pool']:.1%} |")
    vec = [(name, res["open_catalogue_vectors"]) for name, res in report["results"].items() if "open_catalogue_vectors" in res]
    if vec:
        rows += ["", "| model | pool + stream vectors: recall@10 | mrr | new-item targets ranked by the extension "
                 "| their recall@10 | new items with a vector |", "|---" * 6 + "|"]
        for name, v in vec:
            rows.append(f"| {name} | {v['all_events']['recall@10']:.4f} | {v['all_events']['mrr']:.4f} "
                        f"| {v['share_new_item_in_index']:.1%} | {v['via_index']['recall@10']:.4f} "
                        f"| {v['extension']['new_items_with_vector']} |")
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
    """Per trained model: the chosen epoch and variant, the epochs run and the validation curve of
    the metric that chose them (or why early stopping was off)."""
    rows = ["| model | chosen epoch | served | rule: count / recency / current session / category | epochs run | valid targets "
            "| valid metric by epoch (chosen in bold) | refit |", "|---|---|---|---|---|---|---|---|"]
    for name, res in report["results"].items():
        es = res.get("early_stopping")
        if not es:
            continue
        w = (es.get("rule") or {}).get("chosen")
        rule = "default" if w is None else \
            f"{w['count']:g} / {w['recency']:g} / {w['current_session']:g} / {w.get('category', 0.0):g}"
        if not es.get("used") and not res.get("epoch_seconds"):  # nothing trained: only the variant was chosen
            if es.get("variant_chosen"):
                rows.append(f"| {name} | – (counts) | {res['served_variant']} | {rule} | – | {es['valid_targets']} | "
                            f"nothing to train: the variant was chosen on the held-out tail | – |")
            continue
        if not es.get("used"):
            rows.append(f"| {name} | {res.get('chosen_epoch')} (fixed) | {res.get('served_variant', '–')} | {rule} | "
                        f"{len(res['epoch_seconds'])} | – | off: {es['reason']} | – |")
            continue
        metric = es.get("metric", "recall@10")
        curve = ", ".join(f"**{v[metric]:.4f}**" if v["epoch"] == res["chosen_epoch"] else f"{v[metric]:.4f}"
                          for v in es["valid"])
        gate = f" (gate {es['gate_shift']:+g})" if es.get("gate_shift") else ""
        rows.append(f"| {name} | {res['chosen_epoch']} | {res.get('served_variant', '–')}{gate} | {rule} | {es['epochs_run']} | "
                    f"{es['valid_targets']} | {metric}: {curve} | {'yes' if es['refit'] else 'no'} |")
    return "\n".join(rows)


def write_outputs(report: dict, json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    if plot_path:
        matplotlib = require("matplotlib", "--plot")
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
