"""Full result tables from `livemb evaluate --json` reports: `python -m livemb.tools.offline.results_doc REPORT...`.

For each report: the dataset line, a summary row per model (the default variant's metrics, the
training it got, seconds per epoch and of the evaluation) and the full table (every model x every
repeat variant x exclude_seen, recall@1/5/10/20, MRR, MRP). docs/RESULTS_FULL.md is this output.

    python -m livemb.tools.offline.results_doc runs/s16/ml100k.json runs/s16/yc.json --out docs/RESULTS_FULL.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from livemb.models.evaluation import DEFAULT_VARIANT, VARIANTS, variant_name
from livemb.tools.offline.evaluate import METRIC_COLUMNS, epochs_text


def training_cells(res: dict) -> tuple[str, str]:
    """(epochs, s/epoch) of one model, ('-', '-') for a counting model; s/epoch of the final run."""
    epochs = epochs_text(res)
    if epochs is None:
        return "-", "-"
    per = res.get("epoch_seconds") or res["fit_epoch_seconds"]
    return epochs, f"{sum(per) / len(per):.1f}"


def summary_table(report: dict) -> str:
    """One row per model: the variant it serves, its metrics on the known targets, recall@10 / MRR
    over all test events (an unknown item is a miss), its training and timings."""
    head = ["model", "served", *METRIC_COLUMNS, "all: recall@10", "all: mrr", "epochs", "s/epoch", "train s", "eval s",
            "targets"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, res in report["results"].items():
        v = res.get("served_variant", DEFAULT_VARIANT)
        m = res["variants"][v]
        every = m.get("all_events") or {"recall@10": float("nan"), "mrr": float("nan")}
        epochs, per = training_cells(res)
        rows.append(f"| {name} | {v} | " + " | ".join(f"{m[c]:.4f}" for c in METRIC_COLUMNS)
                    + f" | {every['recall@10']:.4f} | {every['mrr']:.4f}"
                    + f" | {epochs} | {per} | {res['train_seconds']:.0f} | {res['eval_seconds']:.0f} | {m['events_scored']} |")
    return "\n".join(rows)


def full_table(report: dict) -> str:
    head = ["model", "variant", *METRIC_COLUMNS]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, res in report["results"].items():
        for r, e in VARIANTS:
            var = variant_name(r, e)
            m = res["variants"][var]
            rows.append(f"| {name} | {var} | " + " | ".join(f"{m[c]:.4f}" for c in METRIC_COLUMNS) + " |")
    return "\n".join(rows)


def render(path: str, report: dict) -> str:
    d = report["dataset"]
    return "\n\n".join([
        f"## `{path}`",
        f"{d['events']:,} events, {d['users']:,} users, {d['items']:,} items; {d['test_events']:,} test events "
        f"({d['test_targets_known']:,} with a known item), test fraction {d['test_frac']}.",
        "Summary (each model's served variant, chosen on the held-out tail of its training data; train s "
        "includes early stopping's validation and the refit):",
        summary_table(report),
        "Every variant (`rep` = the model's own repeat path, learned mixture for the neural models and the "
        "rule for the counting ones; `rule` = the fixed recent-first rule; `norep` = explore only; then "
        "exclude_seen none / session / history):",
        full_table(report),
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--out", help="write the markdown here (default: print it)")
    ap.add_argument("--title", default="# Full result tables")
    args = ap.parse_args(argv)
    parts = [args.title]
    for p in args.reports:
        parts.append(render(p, json.loads(Path(p).read_text())))
    text = "\n\n".join(parts) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
