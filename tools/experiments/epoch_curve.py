"""Test metrics after every epoch of a fixed-epoch run (a diagnostic for early stopping).

    python -m livemb.tools.experiments.epoch_curve --data LOG [--items ITEMS] --models gru,hiertcn --epochs 8 \
        [--gate-shifts 0,2] --json OUT

Trains each model on the whole train period (the evaluation's temporal split) for --epochs with
the same seeds as `livemb evaluate --valid-fraction 0`, and after each epoch runs the evaluation
protocol on the test period (`rep+none`, exclude_seen none, and the explore path alone,
`norep+none`: the published embedding's own ranking); `rep+none` once per mixture gate shift of
--gate-shifts (SeqModel.gate_shift; the first one is the curve's headline). Epoch k's figures are what a refit for
k epochs gives, so the curve shows whether the epoch chosen on the held-out train tail is near
the test's best. It reads the test period, so it is for checking the method, never for choosing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from livemb.models.early_stop import EMBEDDING_VARIANT
from livemb.models.evaluation import build_model, evaluate_model
from livemb.models.train import TrainConfig, _run_epochs, make_chunks, sequences_from_frame
from livemb.tools.args import add_log_args
from livemb.tools.data.eventlog import load_log, temporal_split
from livemb.tools.data.item_embeddings import items_for
from livemb.tools.experiments import process_setup


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--items")
    add_log_args(ap)
    ap.add_argument("--models", default="gru,hiertcn")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-average", type=float, default=TrainConfig.weight_average)
    ap.add_argument("--gate-shifts", default="0", help="comma-separated shifts of the mixture gate to score the "
                    "served ranking under after each epoch (the checkpoint's gate_shift)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    process_setup()
    shifts = [float(x) for x in args.gate_shifts.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    df = load_log(args.data, args.columns, args.ts_unit)
    table = items_for(df, args.items, 64, train_only=True)
    train_df, test_df = temporal_split(df, 0.2)
    train, test = sequences_from_frame(train_df, table), sequences_from_frame(test_df, table)
    cfg = TrainConfig(epochs=args.epochs, valid_fraction=0.0, seed=args.seed,
                      weight_average=args.weight_average)
    out: dict = {"source": args.data, "epochs": args.epochs, "seed": args.seed, "models": {}}
    for name in args.models.split(","):
        torch.manual_seed(cfg.seed)  # the same initial weights as `livemb evaluate` (tools/evaluate.run_evaluation)
        model = build_model(name, table.padded_vectors(), table.category_codes())
        curve = []

        def on_epoch(epoch: int, model=model, curve=curve, name=name) -> bool:
            served = {}
            for shift in shifts:
                model.gate_shift = shift
                res = evaluate_model(model, train, test, progress=False)
                served[shift] = {"recall@10": res["rep+none"]["recall@10"], "mrr": res["rep+none"]["mrr"]}
            model.gate_shift = 0.0
            model.train()
            m, e = served[shifts[0]], res[EMBEDDING_VARIANT]  # the explore path alone: the same under any shift
            curve.append({"epoch": epoch, "recall@10": m["recall@10"], "mrr": m["mrr"],
                          "embedding_recall@10": e["recall@10"], "embedding_mrr": e["mrr"],
                          "by_gate_shift": {str(k): v for k, v in served.items()}})
            logging.info("%s epoch %d test recall@10 / mrr %s; the embedding alone (%s) %.4f / %.4f", name, epoch,
                         ", ".join(f"{v['recall@10']:.4f} / {v['mrr']:.4f} (shift {k:g})" for k, v in served.items()),
                         EMBEDDING_VARIANT, e["recall@10"], e["mrr"])
            return False

        hist = {"epoch_seconds": [], "loss": [], "targets": 0}
        _run_epochs(model, make_chunks(list(train.values()), cfg.max_len), cfg, cfg.epochs, hist, on_epoch)
        out["models"][name] = curve
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
