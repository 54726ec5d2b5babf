"""The learned repeat mixture against the best rule, from `livemb evaluate --json` reports.

    python -m livemb.tools.experiments.versus_rule runs/i8d/eco-all.json runs/i8d/eco-refit.json "runs/i8d/yc-pop.json=pop vectors" ...

(`PATH=NOTE` adds NOTE to that report's rows; `PATH=rules-only` pools its rules, prints none of its rows.)

Reports of the same log (dataset.source and size) are pooled: the best rule of a log is the
best `rule+none` of any model in any of its reports (the counting baselines' `rep` is the rule;
each report's rule has the order its model chose on the held-out tail, or the default order in
reports made with `--no-choose-rule` or before the choice existed), per metric; each trained
model's `rep+none` (exclude_seen none) is compared with it. Prints one Markdown table (the bar:
the mixture at least as good as the best rule on every log).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("recall@10", "mrr")


def _key(report: dict) -> str:
    d = report["dataset"]
    return f"{Path(d.get('source', '?')).name} ({d['events']} events, {d['items']} items)"


def versus_rule_table(reports: list[dict], notes: list[str] | None = None) -> str:
    logs: dict[str, list[dict]] = {}
    for r, note in zip(reports, notes or [""] * len(reports), strict=True):
        logs.setdefault(_key(r), []).append({**r, "note": note})
    rows = ["| log | model (chosen epoch) | mixture recall@10 / MRR | same model + rule | best rule recall@10 / MRR "
            "(model) | mixture >= best rule? recall@10 / MRR |", "|---|---|---|---|---|---|"]
    for log, reps in logs.items():
        rules = [(name, res["variants"]["rule+none"]) for r in reps for name, res in r["results"].items()]
        best = {m: max(rules, key=lambda x, m=m: x[1][m]) for m in METRICS}
        for r in reps:
            if r["note"] == "rules-only":
                continue
            for name, res in r["results"].items():
                if not res.get("early_stopping") and not res.get("epoch_seconds"):
                    continue  # not trained: a counting model, its rep is the rule
                es = res.get("early_stopping") or {}
                label = f"{name} ({res.get('chosen_epoch')}{', refit' if es.get('refit') else ''}{', ' + r['note'] if r['note'] else ''})"
                mix, rule = res["variants"]["rep+none"], res["variants"]["rule+none"]
                ok = ["yes" if mix[m] >= best[m][1][m] else f"no ({mix[m] - best[m][1][m]:+.4f})" for m in METRICS]
                rows.append(f"| {log} | {label} | {mix['recall@10']:.4f} / {mix['mrr']:.4f} | "
                            f"{rule['recall@10']:.4f} / {rule['mrr']:.4f} | {best['recall@10'][1]['recall@10']:.4f} "
                            f"({best['recall@10'][0]}) / {best['mrr'][1]['mrr']:.4f} ({best['mrr'][0]}) | "
                            f"{ok[0]} / {ok[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    args = ap.parse_args(argv)
    paths, notes = zip(*((a.partition("=")[0], a.partition("=")[2]) for a in args.reports), strict=True)
    print(versus_rule_table([json.loads(Path(p).read_text()) for p in paths], list(notes)))


if __name__ == "__main__":
    main()
