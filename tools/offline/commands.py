"""Offline commands behind the CLI: synth, item-embeddings, train, evaluate, embed, index.

Each `run_*` takes its command's typed arguments (tools/args.py) and the settings and returns the
exit code; `train_checkpoint` is the one trainer (`livemb train` and the harness's small model).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from livemb.core.errors import ConfigError
from livemb.core.items import ItemTable
from livemb.core.progress import progress as progress_bar
from livemb.core.settings import Settings
from livemb.models import MODEL_REGISTRY, EventBatch, newitems
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.grouping import group_by_user
from livemb.models.retrieval import build_index_file
from livemb.models.serving import Serving
from livemb.models.train import TrainConfig, sequences_from_frame, train_model
from livemb.tools.args import EmbedArgs, EvaluateArgs, IndexArgs, ItemEmbeddingsArgs, SynthArgs, TrainArgs
from livemb.tools.data.eventlog import load_log
from livemb.tools.data.item_embeddings import build_item_vectors, items_for, vectors_before
from livemb.tools.data.synth import synth_log, write_log
from livemb.tools.data.synth_ecommerce import synth_ecommerce
from livemb.tools.offline.evaluate import (
    early_stopping_table,
    event_type_table,
    markdown_table,
    memory_split_table,
    open_catalogue_table,
    run_evaluation,
    session_start_table,
    variants_table,
    write_outputs,
)

log = logging.getLogger("livemb")


def train_checkpoint(model_name: str, df: pd.DataFrame, table: ItemTable, out: str | Path, cfg: TrainConfig, *,
                     device: str, overrides: dict, progress: bool = True,
                     item_vectors_kind: str | None = None) -> dict:
    """Train `model_name` on every event of `df` from cfg.seed's initial weights, save the checkpoint
    (with its training history) to `out`, print one line; returns the history. item_vectors_kind:
    `table` was built from `df` with this kind (early stopping then chooses on vectors rebuilt
    without its held-out tail)."""
    torch.manual_seed(cfg.seed)  # initial weights from --seed, as `livemb evaluate` does
    codes = table.category_codes()
    model = build_model(model_name, table.padded_vectors(), codes, **overrides)
    model.to(device)
    seqs = list(sequences_from_frame(df, table).values())
    before = vectors_before(df, table, item_vectors_kind) if item_vectors_kind else None
    hist = train_model(model, seqs, cfg, progress=progress, vectors_before=before)
    save_checkpoint(out, model, table.fingerprint, extra={"history": hist})
    per_epoch = np.mean(hist["epoch_seconds"]) if hist["epoch_seconds"] else 0.0
    gate = f" with the gate shifted by {model.gate_shift:+g}" if model.gate_shift else ""
    # the repeat path reads them (docs/MODELS.md "Item categories")
    cats = "" if codes is None else f", reads {int(codes.max())} item categories"
    print(f"saved {out} ({model.name}, serves {model.served.name}{gate}{cats}, device {device}, {hist.get('chosen_epoch')} epochs, "
          f"{per_epoch:.2f} s/epoch, final loss {hist['loss'][-1] if hist['loss'] else float('nan'):.4f})")
    return hist


def run_train(a: TrainArgs, settings: Settings) -> int:
    cfg = TrainConfig(**a.train.config_fields())  # a bad flag fails here, before any file is written
    df = load_log(a.data, a.log_format.columns, a.log_format.ts_unit)
    table = items_for(df, a.items, a.train.dim, train_only=False, kind=a.train.item_vectors)
    if not a.items:
        table.save(Path(a.out).with_suffix(".items.npz"))
    train_checkpoint(a.model, df, table, a.out, cfg,
                     device=settings.resolved_device(), overrides=a.train.model_overrides(settings),
                     item_vectors_kind=None if a.items else a.train.item_vectors)
    return 0


def run_evaluate(a: EvaluateArgs, settings: Settings) -> int:
    evaluate(a, settings)
    return 0


def evaluate(a: EvaluateArgs, settings: Settings) -> dict:
    cfg = TrainConfig(**a.train.config_fields())  # a bad flag fails before the log is read
    df = load_log(a.data, a.log_format.columns, a.log_format.ts_unit)
    if a.max_users:
        keep = df["user_id"].drop_duplicates().iloc[: a.max_users]
        df = df[df["user_id"].isin(set(keep))].reset_index(drop=True)
    table = items_for(df, a.items, a.train.dim, train_only=True, kind=a.train.item_vectors)
    names = a.models.split(",") if a.models else list(MODEL_REGISTRY)
    unknown = [n for n in names if n not in MODEL_REGISTRY]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; registered: {', '.join(MODEL_REGISTRY)}")
    report = run_evaluation(df, table, names, cfg, test_frac=a.test_frac,
                            device=settings.resolved_device(), model_overrides=a.train.model_overrides(settings),
                            drop_event_types=a.drop_event_types, repeat_path=settings.repeat_path,
                            exclude_seen=settings.exclude_seen,
                            item_vectors_kind=None if a.items else a.train.item_vectors,
                            open_catalogue=settings.open_catalogue,
                            new_vectors={"window": settings.new_item_window, "cap": settings.new_item_cap,
                                         "min_evidence": settings.new_item_min_evidence}
                            if settings.new_item_vectors else None)
    report["dataset"]["source"] = str(a.data)
    report["dataset"]["items_source"] = (str(a.items) if a.items
                                         else f"built from the train part ({a.train.item_vectors})")
    codes = table.category_codes()  # what the neural models' slot scorer reads (docs/MODELS.md)
    report["dataset"]["item_categories"] = 0 if codes is None else int(codes.max())
    write_outputs(report, a.json, a.plot)
    print(markdown_table(report))
    print()
    if report["dataset"]["open_catalogue"]:
        print(open_catalogue_table(report))
        print()
    print(variants_table(report, "recall@10"))
    print()
    print(variants_table(report, "mrr"))
    print()
    print(session_start_table(report))
    print()
    print(event_type_table(report))
    print()
    print(memory_split_table(report))
    print()
    print(early_stopping_table(report))
    return report


def embed_users(serving: Serving, df, batch_users: int = 512, open_catalogue: bool = True):
    """Final embedding and candidates per user after all events of `df` (output-topic format),
    through the same `Serving` unit as the live worker (`open_catalogue`: with its new-item pool,
    models/newitems.py)."""
    seqs = sequences_from_frame(df, serving.table)
    users = sorted(seqs)
    last_ts = df.groupby("user_id")["ts"].max()
    raw_ids = {}
    if open_catalogue:
        keys, raw = newitems.event_keys(df["item_id"].to_numpy(), serving.table.lookup(df["item_id"].to_numpy()))
        names, groups = group_by_user(df["user_id"].to_numpy())
        raw_ids = {str(n): (keys[g], raw[g]) for n, g in zip(names, groups, strict=True)}
    for i in progress_bar(range(0, len(users), batch_users), desc="embed", unit="batch"):
        group = users[i : i + batch_users]
        ev = EventBatch.from_sequences(*zip(*(seqs[u] for u in group), strict=True))
        init = serving.model.init_state(len(group))
        if not open_catalogue:
            st, u = serving.advance(init, ev)
        else:
            st, u = serving.advance(newitems.with_pool(init), ev)
            T, dev = ev.item.shape[1], serving.model.device
            st.update(newitems.update_pool(serving.model, newitems.with_pool(init), ev.to(dev),
                                           newitems.pad([raw_ids[x][0] for x in group], T, dev),
                                           newitems.pad([raw_ids[x][1] for x in group], T, dev)))
        yield from serving.messages(group, st, u, last_ts.loc[group].to_numpy(), emitted_at=int(time.time() * 1000))


def run_embed(a: EmbedArgs, settings: Settings) -> int:
    df = load_log(a.data, a.log_format.columns, a.log_format.ts_unit)
    serving = Serving.load(a.model, a.items, index=settings.index, topk=settings.topk,
                           exclude_seen=settings.exclude_seen, repeat_path=settings.repeat_path)
    n = 0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "wb") as f:
        for _user, msg in embed_users(serving, df, open_catalogue=settings.open_catalogue):
            f.write(msg + b"\n")
            n += 1
    print(f"wrote {n} users to {a.out}")
    return 0


def run_synth(a: SynthArgs, settings: Settings) -> int:
    eco = a.profile == "ecommerce"
    users = a.users or (400 if eco else 300)
    items = a.items or (20000 if eco else 500)
    days = a.days or (30 if eco else 14)
    cart_return = a.cart_return or 0.0
    if cart_return and not eco:
        raise SystemExit("livemb synth: --cart-return needs --profile ecommerce")
    extra = {"cart_return": cart_return} if eco else {}
    make = synth_ecommerce if eco else synth_log
    df, ids, vectors = make(users=users, items=items, days=days, seed=a.seed, dim=a.dim, **extra)
    path = write_log(df, a.out)
    msg = f"wrote {len(df)} events ({users} users, {items} items) to {path}"
    if a.items_out:
        p = ItemTable(ids, vectors).save(a.items_out)
        msg += f"; planted item vectors to {p}"
    print(msg)
    return 0


def run_item_embeddings(a: ItemEmbeddingsArgs, settings: Settings) -> int:
    df = load_log(a.data, a.log_format.columns, a.log_format.ts_unit)
    table = build_item_vectors(df, dim=a.dim, kind=a.item_vectors)
    p = table.save(a.out)
    print(f"wrote {len(table)} x {table.dim} item vectors to {p} (fingerprint {table.fingerprint})")
    return 0



def _index_params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            out[name] = int(value)
        except ValueError:
            raise ConfigError(f"--param {pair!r}: expected NAME=INTEGER") from None
        if not sep or not name:
            raise ConfigError(f"--param {pair!r}: expected NAME=INTEGER")
    return out


def run_index(a: IndexArgs, settings: Settings) -> int:
    meta = build_index_file(a.items, a.index, a.out, _index_params(a.param))
    print(f"{a.out}: {meta['kind']} over {meta['n_items']} x {meta['dim']} items {meta['items_fingerprint']} "
          f"{meta['params']}, built in {meta['build_seconds']:.1f}s")
    return 0
