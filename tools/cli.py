"""`livemb` command line: one parser, thin handlers. Settings come from flags + LIVEMB_* env."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import EXPECTED, ConfigError, exit_code
from core.settings import EXCLUDE_SEEN, INDEX_KINDS, REPEAT_PATHS, Settings, load_settings
from models.base import ModelConfig
from models.repeat import REPEAT_MODES
from models.retrieval import build_index_file
from models.train import LOSSES, VALID_METRICS, TrainConfig
from stream.broker import run_broker_foreground
from stream.kafka_io import replay, tail
from stream.processor import ModelProcessor
from stream.security import kafka_python_security
from tools.args import (
    Args,
    BenchArgs,
    BrokerArgs,
    ConfigArgs,
    DashboardArgs,
    DemoArgs,
    DlqArgs,
    EmbedArgs,
    EvaluateArgs,
    IndexArgs,
    ItemEmbeddingsArgs,
    RebuildArgs,
    ReplayArgs,
    SchemasArgs,
    SoakArgs,
    SynthArgs,
    TailArgs,
    TrainArgs,
    WorkerArgs,
    from_namespace,
)
from tools.bench.bench import run_bench
from tools.bench.soak import run_soak
from tools.data.eventlog import add_log_args, load_log
from tools.data.item_embeddings import KINDS as ITEM_VECTOR_KINDS
from tools.offline import commands as offline
from tools.ops.config_doc import readme_block
from tools.ops.dashboard import cmd_dashboard
from tools.ops.demo import run_demo
from tools.ops.dlq import add_parsers as add_contract_parsers
from tools.ops.dlq import run_dlq, run_schemas
from tools.ops.rebuild import run_rebuild

# How a command runs: build_parser() declares every flag; main() reads the parsed flags once into
# the command's frozen dataclass (tools/args.py), builds the settings from it (settings_for) and
# calls the handler that COMMANDS (below) names for it, which returns the exit code.


def _train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()  # the defaults live in one place
    p.add_argument("--epochs", type=int, default=d.epochs, help="the maximum with early stopping, else the count")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="early stopping: hold out this last fraction of the train period's time range (0: off, "
                        "a fixed --epochs)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stopping: epochs without improvement (or half the best epoch's count, when more)")
    p.add_argument("--valid-metric", choices=list(VALID_METRICS), default=d.valid_metric)
    p.add_argument("--valid-min-gain-se", type=float, default=d.valid_min_gain_se,
                   help="early stopping: an epoch is better only by more than this many standard errors of the "
                        "metric (0: any gain)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=d.refit,
                   help="early stopping: after choosing the epoch count, retrain on the whole train period "
                        "(--no-refit: keep the best epoch's weights, trained without the held-out tail)")
    p.add_argument("--loss", choices=list(LOSSES), default=d.loss)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed,
                   help="initial weights, batch order, negatives and the validation subset (rerun with others to "
                        "see the spread)")
    p.add_argument("--dim", type=int, default=64, help="item-vector size when they are built from the log")
    m = ModelConfig()
    p.add_argument("--repeat", choices=list(REPEAT_MODES), default=m.repeat,
                   help="repeat path: learned mixture, the fixed recent-first rule, or none")
    p.add_argument("--recent-items", type=int, default=m.recent_items, help="memory slots per user (state budget!)")
    _item_kind_arg(p)


def _item_kind_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--item-vectors", choices=list(ITEM_VECTOR_KINDS), default=ITEM_VECTOR_KINDS[0],
                   help="PPMI-SVD kind when vectors are built from the log (docs/MODELS.md)")


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="kafka://host:port")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--topk", type=int)
    p.add_argument("--exclude-seen", choices=EXCLUDE_SEEN,
                   help="remove seen items: none, session or history (default: what the checkpoint chose)")
    p.add_argument("--repeat-path", choices=REPEAT_PATHS,
                   help="rep (the model's own), rule (recent items first) or norep (default: the checkpoint's choice)")
    p.add_argument("--index", choices=INDEX_KINDS)
    p.add_argument("--session-gap-s", type=float)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="livemb", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("synth", help="synthetic log with planted long-term tastes and session intents")
    p.add_argument("--profile", choices=["default", "ecommerce"], default="default",
                   help="default: planted tastes/intents/ring walks; ecommerce: repeats, event types, new-item tail")
    p.add_argument("--users", type=int, help="default 300 (ecommerce 400)")
    p.add_argument("--items", type=int, help="default 500 (ecommerce 20000)")
    p.add_argument("--days", type=int, help="default 14 (ecommerce 30)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--items-out", help="also write the planted item vectors (items.npz)")
    p.add_argument("--cart-return", type=float, default=0.0, metavar="P",
                   help="ecommerce: the event after a cart returns to the carted item with probability P "
                        "(a stronger event-type signal; default 0)")

    p = sub.add_parser("item-embeddings", help="item vectors from co-occurrence (PPMI + SVD)")
    p.add_argument("--data", required=True)
    p.add_argument("--dim", type=int, default=64)
    _item_kind_arg(p)
    p.add_argument("--out", required=True)
    add_log_args(p)

    p = sub.add_parser("train", help="train one model")
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="hiertcn")
    p.add_argument("--items", help="items.npz (default: built from the log and saved next to --out)")
    p.add_argument("--out", required=True)
    add_log_args(p)
    _train_args(p)
    _settings_args(p)

    p = sub.add_parser("evaluate", help="SPEC section 4 protocol for every model")
    p.add_argument("--data", required=True)
    p.add_argument("--items")
    p.add_argument("--models", help="comma-separated (default: every registered model)")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--max-users", type=int, help="evaluate on the first N users only (quick runs)")
    p.add_argument("--drop-event-types", action="store_true",
                   help="models see every event as a view; targets are still grouped by their real previous type")
    add_log_args(p)
    _train_args(p)
    _settings_args(p)

    p = sub.add_parser("embed", help="final embedding + candidates per user (output-topic format)")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--items", required=True)
    p.add_argument("--out", required=True)
    add_log_args(p)
    _settings_args(p)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) in the foreground")
    p.add_argument("--port", type=int, default=9092)

    p = sub.add_parser("worker", help="the production worker (any Kafka cluster)")
    p.add_argument("--model", help="checkpoint (livemb train); required unless --processor is given")
    p.add_argument("--items", help="items.npz the checkpoint was trained with; required with --model")
    p.add_argument("--processor", help="module:factory(settings) -> BatchProcessor instead of the model "
                   "(tests use tests.counting:make_processor)")
    p.add_argument("--data-dir", help="RocksDB state directory (default runs/worker)")
    p.add_argument("--web-port", type=int, help="/metrics, /healthz, /readyz port")
    p.add_argument("--partitions", type=int)
    p.add_argument("--batch-max-events", type=int)
    p.add_argument("--batch-max-wait-ms", type=int)
    p.add_argument("--reload-check-s", type=float, help="seconds between hot-swap checks (SIGHUP: at once)")
    p.add_argument("--standby-replicas", type=int, help="standby copies of other workers' state partitions")
    p.add_argument("--index-path", help="prebuilt index (livemb index) for --items and --index; unset: built at start")
    p.add_argument("--loglevel", default="info")
    _settings_args(p)

    p = sub.add_parser("index", help="build the faiss index of an item table ahead of time (worker --index-path)")
    p.add_argument("--items", required=True, help="items.npz")
    p.add_argument("--index", choices=INDEX_KINDS, default="hnsw")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a tuned parameter, e.g. efSearch=256, M=48, nprobe=64 (repeatable)")
    p.add_argument("--out", required=True, help="index file; its sidecar goes to OUT.json")

    p = sub.add_parser("replay", help="produce an event log into the input topic")
    p.add_argument("log")
    p.add_argument("--rate", default="max", help="events/s or 'max'")
    add_log_args(p)
    _settings_args(p)

    p = sub.add_parser("tail", help="print recommendations as they arrive")
    _settings_args(p)

    p = sub.add_parser("rebuild-state", help="replay the input topic into a fresh state table, then switch over")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--from-beginning", action="store_true", help="from the earliest retained input offset")
    g.add_argument("--from-timestamp", help="from the first input record at or after T (epoch ms or ISO-8601)")
    p.add_argument("--model", help="checkpoint the new state is built with")
    p.add_argument("--items", help="items.npz of that checkpoint")
    p.add_argument("--processor", help="module:factory instead of a model (tests)")
    p.add_argument("--app-id", help="new app id = consumer group + table (default <app_id>-rebuild-<time>)")
    p.add_argument("--data-dir", help="state directory of the new table (default <data_dir>-<app id>)")
    p.add_argument("--scratch-topic", help="where the backfill's outputs go (default <topic_out>.<app id>)")
    p.add_argument("--switch-file", help="env file to write atomically when caught up (LIVEMB_APP_ID, ...)")
    p.add_argument("--partitions", type=int)
    p.add_argument("--timeout-s", type=float, default=24 * 3600.0)
    _settings_args(p)

    add_contract_parsers(sub)  # schemas, dlq (tools/ops/dlq.py)

    sub.add_parser("config", help="print the configuration reference (every LIVEMB_* variable) as Markdown")

    p = sub.add_parser("dashboard", help="render the key panels from a Prometheus to a PNG (matplotlib)")
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--range", default="15m", help="how far back from now (e.g. 90s, 15m, 2h)")
    p.add_argument("--window", default="1m", help="rate() window (>= 4 scrape intervals)")
    p.add_argument("--job", default="livemb", help="scrape job of the workers ('' for any)")

    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--data", help="event log to replay (default: a synthetic one)")
    p.add_argument("--model", help="checkpoint (default: train a small HierTCN)")
    p.add_argument("--items")
    p.add_argument("--offline", action="store_true", help="offline demo only: synth, train, evaluate")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--dashboard", metavar="PNG", help="also run a local Prometheus (1 s scrapes) and render "
                   "the dashboard panels from it at the end (livemb dashboard)")
    add_log_args(p)
    _settings_args(p)

    p = sub.add_parser("soak", help="the worker at a fraction of its max rate for a long time: RSS, lag, errors")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured max rate")
    p.add_argument("--every", type=float, default=10.0, help="sampling interval, seconds")
    p.add_argument("--max-events", type=int, default=20_000, help="clicks sent at full speed to measure the max rate")
    p.add_argument("--model", help="checkpoint (default: train a small HierTCN)")
    p.add_argument("--items")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--workdir", default="runs/soak")
    add_log_args(p)
    _settings_args(p)

    p = sub.add_parser("bench", help="the worker against its ceilings in one run: passthrough, latency vs load, "
                       "scale-out, offline components (docs/BENCHMARKS.md)")
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--items-n", type=int, default=50_000, help="catalogue size of the synthetic log")
    p.add_argument("--days", type=float, default=14)
    p.add_argument("--train-events", type=int, default=20_000, help="HierTCN is trained 1 epoch on this many events")
    p.add_argument("--loads", type=lambda v: [float(x) for x in v.split(",")], default=[0.1, 0.25, 0.5, 0.75],
                   help="offered load steps, fractions of the measured max")
    p.add_argument("--step-seconds", type=float, default=15.0)
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="add a long step at --soak-load")
    p.add_argument("--soak-load", type=float, default=0.5)
    p.add_argument("--big-items", type=int, default=0, metavar="N",
                   help="also run the worker over a catalogue of N items (e.g. 1000000) with --big-index")
    p.add_argument("--big-index", default="hnsw", choices=["hnsw", "ivfpq"])
    p.add_argument("--quick", action="store_true", help="small offline sizes (CI smoke)")
    p.add_argument("--retrieval-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[50_000],
                   help="catalogue sizes of the offline retrieval part (add 1000000 for the 1M figures: "
                   "+5 min for the hnsw and ivfpq builds)")
    p.add_argument("--skip-offline", action="store_true", help="only the live parts")
    p.add_argument("--data", help="with --model/--items: bench this log instead of the synthetic one")
    p.add_argument("--model")
    p.add_argument("--items")
    p.add_argument("--json", default="runs/bench/bench.json")
    p.add_argument("--plot", default="runs/bench/bench.png")
    p.add_argument("--workdir", default="runs/bench")
    _settings_args(p)
    return ap


def load_processor(spec: str | None, settings: Settings):
    """The model processor, or 'module:factory' where factory(settings) -> BatchProcessor."""
    if spec is None:
        return ModelProcessor(settings)
    mod, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"--processor must be module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--processor {spec}: {e}") from None
    return factory(settings)


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


# ---------------------------------------------------------------- the handlers that live here (stream-facing)


def run_broker(a: BrokerArgs, settings: Settings) -> int:
    return run_broker_foreground(a.port)


def run_worker(a: WorkerArgs, settings: Settings) -> int:
    # The one function-level project import of tools/ (tests/test_tools_layout.py): stream.app
    # imports faust, which only the worker needs; every other command starts without it.
    from stream.app import run_worker as run_faust_worker

    run_faust_worker(settings, load_processor(a.processor, settings), a.loglevel)
    return 0


def run_index(a: IndexArgs, settings: Settings) -> int:
    meta = build_index_file(a.items, a.index, a.out, _index_params(a.param))
    print(f"{a.out}: {meta['kind']} over {meta['n_items']} x {meta['dim']} items {meta['items_fingerprint']} "
          f"{meta['params']}, built in {meta['build_seconds']:.1f}s")
    return 0


def _rate(text: str) -> float | None:
    """`replay --rate`: events/s, or None for 'max'."""
    try:
        return None if text == "max" else float(text)
    except ValueError:
        raise ConfigError(f"--rate {text!r}: expected events/s or 'max'") from None


def run_replay(a: ReplayArgs, settings: Settings) -> int:
    df = load_log(a.log, a.log_format.columns, a.log_format.ts_unit)
    replay(df, settings.broker, settings.topic_in, _rate(a.rate), security=kafka_python_security(settings))
    return 0


def run_tail(a: TailArgs, settings: Settings) -> int:
    tail(settings.broker, settings.topic_out, security=kafka_python_security(settings))
    return 0


def run_config(a: ConfigArgs, settings: Settings) -> int:
    print(readme_block())
    return 0


# ---------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Command:
    """A subcommand: the dataclass its flags are read into, and the handler -> exit code."""

    args: type[Args]
    run: Callable[[Any, Settings], int]


COMMANDS: dict[str, Command] = {
    "synth": Command(SynthArgs, offline.run_synth),
    "item-embeddings": Command(ItemEmbeddingsArgs, offline.run_item_embeddings),
    "train": Command(TrainArgs, offline.run_train),
    "evaluate": Command(EvaluateArgs, offline.run_evaluate),
    "embed": Command(EmbedArgs, offline.run_embed),
    "broker": Command(BrokerArgs, run_broker),
    "worker": Command(WorkerArgs, run_worker),
    "index": Command(IndexArgs, run_index),
    "replay": Command(ReplayArgs, run_replay),
    "tail": Command(TailArgs, run_tail),
    "rebuild-state": Command(RebuildArgs, run_rebuild),
    "config": Command(ConfigArgs, run_config),
    "schemas": Command(SchemasArgs, run_schemas),
    "dlq": Command(DlqArgs, run_dlq),
    "dashboard": Command(DashboardArgs, lambda a, _settings: cmd_dashboard(a)),
    "demo": Command(DemoArgs, run_demo),
    "soak": Command(SoakArgs, run_soak),
    "bench": Command(BenchArgs, run_bench),
}


def settings_for(args: Args) -> Settings:
    """Settings from a command's flags (unset ones: LIVEMB_* env, then the defaults)."""
    return load_settings(**args.settings_overrides())


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = COMMANDS[ns.cmd]
    args = from_namespace(command.args, ns)
    settings = settings_for(args)
    for noisy in ("kafka", "aiokafka", "faust", "mode", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return command.run(args, settings)
    except EXPECTED as e:  # one line, the exit code core/errors.py gives it; anything else is a bug: traceback
        print(f"livemb {ns.cmd}: error: {e}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
