"""The worker's online quality counters against `livemb evaluate`'s all-events figures, on a real log.

    python -m livemb.tools.experiments.online_vs_offline --data LOG [--columns ..] [--ts-unit s] [--model hiertcn]

As `livemb evaluate` does: the last `--test-frac` of the time range is the test part, the item
vectors are built from the train part and the model is trained on it (default TrainConfig, early
stopping on the held-out tail). Then the live batch step (`stream.processor.ModelProcessor`, the
worker's own) is fed the train part in micro-batches (the warm-up: states and each user's last
published list) and the test part one event per user per batch (each user's t-th test event in
batch t, i.e. a replay slow enough that nobody has two events in one batch), with the open
catalogue off and on. Its online counters (`livemb_online_*`: every event of a user who was sent a
list is a target, an item not in the list a miss) are printed beside the evaluation's all-events
figures of the same model and variant (every test event a target, an unknown item a miss).

Where they part, by construction (docs/STREAMING.md "Online quality"): live MRR is MRR@20; on an
event that opens a session the evaluation ranks with the next-session embedding and live with the
list of the previous event; a test user with no train event is a target offline from its first
test event and live from its second.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from livemb.core.events import ValidEvent
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model, evaluate_model
from livemb.models.newitems import key_sequences
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.stream.processor import ModelProcessor
from livemb.stream.quality import KS
from livemb.tools.data.eventlog import load_log, temporal_split
from livemb.tools.data.item_embeddings import DEFAULT_KIND, items_for, vectors_before
from livemb.tools.experiments import process_setup

WARM_BATCH = 2048  # events per warm-up batch: the state after a user's events does not depend on it


def _events(df, offset: int = 0) -> list[ValidEvent]:
    return [ValidEvent(r.user_id, r.item_id, int(r.ts), r.event_type, f"e{offset + i}", 0, offset + i)
            for i, r in enumerate(df.itertuples(index=False))]


def online(settings: Settings, train_df, test_df) -> dict:
    """Replay through the live batch step; the online counters over the test part."""
    proc = ModelProcessor(settings)
    blobs: dict[str, bytes] = {}
    warm = _events(train_df)
    for i in range(0, len(warm), WARM_BATCH):
        batch = warm[i : i + WARM_BATCH]
        blobs.update(proc.process(batch, {e.user_id: blobs.get(e.user_id) for e in batch}).states)
    by_user = {u: _events(g, 10**9) for u, g in test_df.groupby("user_id", sort=False)}
    hits, rr, n = np.zeros(len(KS)), 0.0, 0
    for t in range(max(map(len, by_user.values()))):
        batch = [evs[t] for evs in by_user.values() if t < len(evs)]
        res = proc.process(batch, {e.user_id: blobs.get(e.user_id) for e in batch})
        blobs.update(res.states)
        hits += res.quality.hits.sum(axis=(1, 2))
        rr += float(res.quality.rr_sum.sum())
        n += int(res.quality.targets.sum())
    return {"targets": n, **{f"recall@{k}": h / max(n, 1) for k, h in zip(KS, hits, strict=True)},
            "mrr@20": rr / max(n, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--columns")
    p.add_argument("--ts-unit", choices=["s", "ms"], default="ms")
    p.add_argument("--model", default="hiertcn")
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64, help="item-vector size (as livemb evaluate's --dim)")
    a = p.parse_args(argv)
    process_setup()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    df = load_log(a.data, a.columns, a.ts_unit)
    train_df, test_df = temporal_split(df, a.test_frac)
    table = items_for(df, None, a.dim, train_only=True, kind=DEFAULT_KIND)
    train, test = sequences_from_frame(train_df, table), sequences_from_frame(test_df, table)
    torch.manual_seed(a.seed)
    model = build_model(a.model, table.padded_vectors(), table.category_codes())
    train_model(model, list(train.values()), TrainConfig(seed=a.seed), progress=True,
                vectors_before=vectors_before(train_df, table, DEFAULT_KIND))
    off = evaluate_model(model, train, test, progress=True,
                         open_keys=(key_sequences(train_df, table), key_sequences(test_df, table)))
    served = model.served.name
    rows = [("offline, closed catalogue (all events)", off[served]["all_events"], off[served]["all_events"]["events"]),
            ("offline, open catalogue (all events)", off["open_catalogue"][served]["all_events"],
             off["open_catalogue"][served]["all_events"]["events"])]
    with tempfile.TemporaryDirectory() as tmp:
        table.save(Path(tmp) / "items.npz")
        save_checkpoint(Path(tmp) / "m.pt", model, table.fingerprint)
        for open_cat in (False, True):
            s = Settings(model_path=str(Path(tmp) / "m.pt"), items_path=str(Path(tmp) / "items.npz"), topk=20,
                         open_catalogue=open_cat)
            live = online(s, train_df, test_df)
            rows.append((f"online, {'open' if open_cat else 'closed'} catalogue", live, live["targets"]))
    print(f"{a.model} serves {served}; {len(test_df):,} test events of {test_df['user_id'].nunique():,} users\n")
    print("| figures | targets | " + " | ".join(f"recall@{k}" for k in KS) + " | MRR |")
    print("|---|---|" + "---|" * (len(KS) + 1))
    for name, m, n in rows:
        mrr = m.get("mrr@20", m.get("mrr"))
        print(f"| {name} | {n:,} | " + " | ".join(f"{m[f'recall@{k}']:.4f}" for k in KS) + f" | {mrr:.4f} |")


if __name__ == "__main__":
    main()
