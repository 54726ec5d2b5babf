"""Offline commands behind the CLI: synth, item-embeddings, train, evaluate, embed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from core.items import ItemTable
from core.progress import progress as progress_bar
from models import EventBatch
from models.checkpoint import save_checkpoint
from models.evaluation import build_model
from models.serving import Serving
from models.train import TrainConfig, sequences_from_frame, train_model
from tools.data.eventlog import parse_columns, read_log, temporal_split
from tools.data.item_embeddings import DEFAULT_KIND, build_item_vectors
from tools.offline.evaluate import (
    early_stopping_table,
    event_type_table,
    markdown_table,
    memory_split_table,
    run_evaluation,
    session_start_table,
    variants_table,
    write_outputs,
)

log = logging.getLogger("livemb")


def load_log(path: str, columns: str | None, ts_unit: str):
    return read_log(path, columns=parse_columns(columns) if columns else None, ts_unit=ts_unit)


def items_for(df, items_path: str | None, dim: int, train_only: bool = True, kind: str = DEFAULT_KIND) -> ItemTable:
    """The given item table, or vectors built from the train part of `df` only (no test leakage)."""
    if items_path:
        return ItemTable.load(items_path)
    train_df = temporal_split(df)[0] if train_only else df
    log.info("building %d-d %s item vectors from %d training events", dim, kind, len(train_df))
    return build_item_vectors(train_df, dim=dim, kind=kind)


def cmd_train(args, settings) -> Path:
    df = load_log(args.data, args.columns, args.ts_unit)
    table = items_for(df, args.items, args.dim, train_only=False, kind=args.item_vectors)
    if not args.items:
        table.save(Path(args.out).with_suffix(".items.npz"))
    cfg = train_config(args)
    torch.manual_seed(cfg.seed)  # initial weights from --seed, as `livemb evaluate` does
    model = build_model(args.model, table.padded_vectors(), **model_overrides(args, settings))
    device = settings.resolved_device()
    model.to(device)
    seqs = list(sequences_from_frame(df, table).values())
    hist = train_model(model, seqs, cfg)
    save_checkpoint(args.out, model, table.fingerprint, extra={"history": hist})
    per_epoch = np.mean(hist["epoch_seconds"]) if hist["epoch_seconds"] else 0.0
    print(f"saved {args.out} ({model.name}, device {device}, {hist.get('chosen_epoch')} epochs, {per_epoch:.2f} s/epoch, "
          f"final loss {hist['loss'][-1] if hist['loss'] else float('nan'):.4f})")
    return Path(args.out)


def train_config(args) -> TrainConfig:
    """TrainConfig from the shared training flags (tools/cli._train_args)."""
    d = TrainConfig()  # callers that build their own namespace (tools/demo.py) get the defaults
    return TrainConfig(epochs=args.epochs, loss=args.loss, batch_size=args.batch_size, lr=args.lr,
                       **{f: getattr(args, f, getattr(d, f)) for f in ("valid_fraction", "patience", "valid_metric",
                                                                       "valid_min_gain_se", "refit", "seed")})


def model_overrides(args, settings) -> dict:
    """ModelConfig fields set from the command line and settings."""
    out = {"session_gap_ms": int(settings.session_gap_s * 1000)}
    for flag, field in (("repeat", "repeat"), ("recent_items", "recent_items")):
        if getattr(args, flag, None) is not None:
            out[field] = getattr(args, flag)
    return out


def cmd_evaluate(args, settings) -> dict:
    from models import MODEL_REGISTRY

    df = load_log(args.data, args.columns, args.ts_unit)
    if args.max_users:
        keep = df["user_id"].drop_duplicates().iloc[: args.max_users]
        df = df[df["user_id"].isin(set(keep))].reset_index(drop=True)
    table = items_for(df, args.items, args.dim, train_only=True, kind=args.item_vectors)
    names = args.models.split(",") if args.models else list(MODEL_REGISTRY)
    unknown = [n for n in names if n not in MODEL_REGISTRY]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; registered: {', '.join(MODEL_REGISTRY)}")
    cfg = train_config(args)
    report = run_evaluation(df, table, names, cfg, test_frac=args.test_frac, device=settings.resolved_device(),
                            model_overrides=model_overrides(args, settings),
                            drop_event_types=getattr(args, "drop_event_types", False))
    report["dataset"]["source"] = str(args.data)
    report["dataset"]["items_source"] = str(args.items) if args.items else f"built from the train part ({args.item_vectors})"
    write_outputs(report, args.json, args.plot)
    print(markdown_table(report))
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


def embed_users(serving: Serving, df, batch_users: int = 512):
    """Final embedding and candidates per user after all events of `df` (output-topic format),
    through the same `Serving` unit as the live worker."""
    seqs = sequences_from_frame(df, serving.table)
    users = sorted(seqs)
    last_ts = df.groupby("user_id")["ts"].max()
    for i in progress_bar(range(0, len(users), batch_users), desc="embed", unit="batch"):
        group = users[i : i + batch_users]
        ev = EventBatch.from_sequences(*zip(*(seqs[u] for u in group), strict=True))
        st, u = serving.advance(serving.model.init_state(len(group)), ev)
        yield from serving.messages(group, st, u, last_ts.loc[group].to_numpy(), emitted_at=int(time.time() * 1000))


def cmd_embed(args, settings) -> None:
    df = load_log(args.data, args.columns, args.ts_unit)
    serving = Serving.load(args.model, args.items, index=settings.index, topk=settings.topk,
                           exclude_seen=settings.exclude_seen)
    n = 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        for _user, msg in embed_users(serving, df):
            f.write(msg + b"\n")
            n += 1
    print(f"wrote {n} users to {args.out}")


def cmd_synth(args, settings) -> None:
    from tools.data.synth import synth_log, write_log
    from tools.data.synth_ecommerce import synth_ecommerce

    eco = getattr(args, "profile", "default") == "ecommerce"
    users = args.users or (400 if eco else 300)
    items = args.items or (20000 if eco else 500)
    days = args.days or (30 if eco else 14)
    cart_return = getattr(args, "cart_return", 0.0) or 0.0
    if cart_return and not eco:
        raise SystemExit("livemb synth: --cart-return needs --profile ecommerce")
    extra = {"cart_return": cart_return} if eco else {}
    make = synth_ecommerce if eco else synth_log
    df, ids, vectors = make(users=users, items=items, days=days, seed=args.seed, dim=args.dim, **extra)
    path = write_log(df, args.out)
    msg = f"wrote {len(df)} events ({users} users, {items} items) to {path}"
    if args.items_out:
        p = ItemTable(ids, vectors).save(args.items_out)
        msg += f"; planted item vectors to {p}"
    print(msg)


def cmd_item_embeddings(args, settings) -> None:
    df = load_log(args.data, args.columns, args.ts_unit)
    table = build_item_vectors(df, dim=args.dim, kind=args.item_vectors)
    p = table.save(args.out)
    print(f"wrote {len(table)} x {table.dim} item vectors to {p} (fingerprint {table.fingerprint})")

