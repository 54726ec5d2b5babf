"""Training throughput (targets/s) of several models on the same log: `python -m livemb.tools.experiments.train_speed`.

Trains each model for a few epochs on the train part of the log (same split, chunks, batches and
loss as `livemb evaluate`) and reports targets/s per epoch, the mean after the first epoch and
the best epoch (the least disturbed by other load on the machine), and the one-off memory replay. `--profile` writes a cProfile of one model's training.

    python -m livemb.tools.experiments.train_speed --data data/ml-100k.tsv --columns user=user_id:token,item=item_id:token,ts=timestamp:float \
        --ts-unit s --models gru,hiertcn --epochs 3 --repeat rule
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch

from livemb.models.evaluation import build_model
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
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
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--loss", default=TrainConfig.loss)
    ap.add_argument("--repeat", default="mixture")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--profile", help="write a cProfile of the LAST model's training to this file (and print the top)")
    args = ap.parse_args(argv)
    process_setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    df = load_log(args.data, args.columns, args.ts_unit)
    table = items_for(df, args.items, 64, train_only=True)
    train_df, _ = temporal_split(df, 0.2)
    seqs = list(sequences_from_frame(train_df, table).values())
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, loss=args.loss, valid_fraction=0.0)  # fixed epochs
    out = {}
    names = args.models.split(",")
    for k, name in enumerate(names):
        model = build_model(name, table.padded_vectors(), table.category_codes(), repeat=args.repeat)
        prof = cProfile.Profile() if args.profile and k == len(names) - 1 else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        hist = train_model(model, seqs, cfg, progress=False)
        if prof:
            prof.disable()
        total = time.perf_counter() - t0
        n = hist["targets"]
        rates = [round(n / s, 1) for s in hist["epoch_seconds"]]
        later = hist["epoch_seconds"][1:] or hist["epoch_seconds"]
        out[name] = {"targets_per_epoch": n, "epoch_seconds": [round(s, 2) for s in hist["epoch_seconds"]],
                     "targets_per_s": rates, "targets_per_s_after_first": round(n * len(later) / sum(later), 1),
                     "targets_per_s_best": round(n / min(hist["epoch_seconds"]), 1),
                     "memory_replay_seconds": round(hist.get("memory_seconds", 0.0), 2),
                     "total_seconds": round(total, 1)}
        print(name, json.dumps(out[name]))
        if prof:
            prof.dump_stats(args.profile)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    if len(names) == 2:
        a, b = names
        for key in ("targets_per_s_after_first", "targets_per_s_best"):
            print(f"{b} / {a} {key}: {out[b][key] / out[a][key]:.2f}x")
    return out


if __name__ == "__main__":
    main()
