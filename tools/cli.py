"""`livemb` command line: one parser, thin handlers. Settings come from flags + LIVEMB_* env."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import livemb.core
from livemb.core.allocator import hold_freed_memory
from livemb.core.choices import (
    EXCLUDE_SEEN,
    INDEX_KINDS,
    ITEM_VECTOR_KINDS,
    LOSSES,
    REPEAT_MODES,
    REPEAT_PATHS,
    VALID_METRICS,
)
from livemb.core.errors import EXPECTED, exit_code
from livemb.tools.args import (
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
    add_log_args,
    from_namespace,
)

if TYPE_CHECKING:
    from livemb.core.settings import Settings

# How a command runs: build_parser() declares every flag; main() reads the parsed flags once into
# the command's frozen dataclass (tools/args.py), builds the settings from it (settings_for) and
# calls the handler that COMMANDS (below) names for it, which returns the exit code.
#
# This module imports no torch, pandas, faust, kafka or pydantic (tests/test_cli_startup.py): the
# handlers are named "module:function" in COMMANDS and imported when their command runs, so
# `livemb --help` and `--version` answer at once, and each command loads only what it uses.
# Flags whose default is a models.train.TrainConfig / models.base.ModelConfig field default to None
# (unset): the config's own default applies, defined in one place.


def version() -> str:
    """The installed distribution's version, else the source tree's (livemb.core.__version__)."""
    try:
        return importlib.metadata.version("livemb")
    except importlib.metadata.PackageNotFoundError:
        return livemb.core.__version__


def _train_args(p: argparse.ArgumentParser) -> None:
    # default None: models.train.TrainConfig's default (tools/args.TrainFlags.config_fields)
    p.add_argument("--epochs", type=int, help="the maximum with early stopping, else the count")
    p.add_argument("--valid-fraction", type=float,
                   help="early stopping: hold out this last fraction of the train period's time range (0: off, "
                        "a fixed --epochs)")
    p.add_argument("--patience", type=int,
                   help="early stopping: epochs without improvement (or half the best epoch's count, when more)")
    p.add_argument("--min-steps", type=int,
                   help="early stopping: never stop before this many optimizer steps (0: patience alone)")
    p.add_argument("--valid-metric", choices=list(VALID_METRICS))
    p.add_argument("--valid-min-gain-se", type=float,
                   help="early stopping: an epoch is better only by more than this many standard errors of the "
                        "metric (0: any gain)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction,
                   help="early stopping: after choosing the epoch count, retrain on the whole train period "
                        "(--no-refit: keep the best epoch's weights, trained without the held-out tail)")
    p.add_argument("--weight-average", type=float,
                   help="decay of the moving average of the weights over optimizer steps, which validation, "
                        "refit and the checkpoint use (0: the last step's weights)")
    p.add_argument("--choose-rule", action=argparse.BooleanOptionalAction,
                   help="choose the repeat rule's order inside the memory (count, recency, current session) on the "
                        "held-out tail (--no-choose-rule: by count, then recency)")
    p.add_argument("--calibrate-gate", action=argparse.BooleanOptionalAction,
                   help="choose a shift of the mixture gate on the held-out tail after every epoch and judge the "
                        "epoch with it (--no-calibrate-gate: the gate as trained, and an epoch must not lose on the served ranking)")
    p.add_argument("--slot-prefit-steps", type=int,
                   help="steps of the mixture's slot scorer fitted alone on the user's own items before the "
                        "epochs (0: off)")
    p.add_argument("--loss", choices=list(LOSSES))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int,
                   help="initial weights, batch order, negatives and the validation subset (rerun with others to "
                        "see the spread)")
    p.add_argument("--dim", type=int, default=64, help="item-vector size when they are built from the log")
    # default None: models.base.ModelConfig's default (tools/args.TrainFlags.model_overrides)
    p.add_argument("--repeat", choices=list(REPEAT_MODES),
                   help="repeat path: learned mixture, the fixed recent-first rule, or none")
    p.add_argument("--recent-items", type=int, help="memory slots per user (state budget!)")
    _item_kind_arg(p)


def _item_kind_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--item-vectors", choices=list(ITEM_VECTOR_KINDS), default=ITEM_VECTOR_KINDS[0],
                   help="PPMI-SVD kind when vectors are built from the log; a log's item categories join the "
                        "symmetric kinds as graph nodes (docs/MODELS.md \"Item vectors\")")


def _broker_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="kafka://host:port (default: LIVEMB_BROKER)")


def _settings_args(p: argparse.ArgumentParser) -> None:
    _broker_arg(p)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--topk", type=int)
    p.add_argument("--exclude-seen", choices=EXCLUDE_SEEN,
                   help="remove seen items: none, session or history (default: what the checkpoint chose)")
    p.add_argument("--repeat-path", choices=REPEAT_PATHS,
                   help="rep (the model's own), rule (recent items first) or norep (default: the checkpoint's choice)")
    p.add_argument("--open-catalogue", action=argparse.BooleanOptionalAction, default=None,
                   help="new item ids (absent from the items) enter each user's repeat memory (default: on; "
                        "evaluate: also rank with them)")
    p.add_argument("--new-item-vectors", action=argparse.BooleanOptionalAction, default=None,
                   help="with the open catalogue: new items get a vector from their co-occurrences and join an "
                        "exact explore extension (default: off; evaluate: also rank with it)")
    p.add_argument("--index", choices=INDEX_KINDS)
    p.add_argument("--session-gap-s", type=float)


def _contract_parsers(sub: argparse._SubParsersAction) -> None:
    """`livemb schemas` and `livemb dlq` (handlers: tools/ops/dlq.py)."""
    p = sub.add_parser("schemas", help="write the topic JSON Schemas (docs/schemas/) from the code, or --check them")
    p.add_argument("--out", default="docs/schemas")
    p.add_argument("--check", action="store_true", help="exit 1 when a file differs from the generated one")

    p = sub.add_parser("dlq", help="the dead-letter topic: `tail` prints records, `redrive` re-produces them")
    p.add_argument("action", choices=["tail", "redrive"])
    p.add_argument("--broker", help="kafka://host:port")
    p.add_argument("--reason", help="only records of this DlqReason (e.g. missing_field:ts)")
    p.add_argument("-n", type=int, default=20, help="tail: the last N records (0: all)")
    p.add_argument("--jsonl", action="store_true", help="tail: one JSON document per record (redrive --from-file)")
    p.add_argument("--idle-s", type=float, default=2.0, help="stop reading the DLQ after this long without records")
    p.add_argument("--since", help="redrive: records dead-lettered at or after T (epoch ms or ISO-8601)")
    p.add_argument("--from-offset", type=int, help="redrive: records at DLQ offset >= N")
    p.add_argument("--from-file", help="redrive: these `dlq tail --jsonl` lines (edited) instead of the DLQ")
    p.add_argument("--dry-run", action="store_true", help="redrive: print what would be sent, send nothing")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="livemb", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"livemb {version()}")
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
    p.add_argument("--shadow-model", metavar="CKPT", help="challenger stepped in shadow on the same batches: own state, "
                   "online metrics with model=\"shadow\", publishes nothing (docs/STREAMING.md, Shadow model)")
    p.add_argument("--shadow-items", metavar="ITEMS", help="items.npz of --shadow-model (default: --items)")
    p.add_argument("--shadow-publish", action="store_true", default=None,
                   help="also publish the shadow's messages to <topic_out>.shadow")
    p.add_argument("--loglevel", default="info")
    _settings_args(p)

    p = sub.add_parser("index", help="build the faiss index of an item table ahead of time (worker --index-path)")
    p.add_argument("--items", required=True, help="items.npz")
    p.add_argument("--index", choices=INDEX_KINDS, default="hnsw")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a tuned parameter, e.g. efSearch=256, M=48, nprobe=64 (repeatable)")
    p.add_argument("--out", required=True, help="index file; its sidecar goes to OUT.json")

    p = sub.add_parser("replay", help="produce an event log into the input topic")
    p.add_argument("log", nargs="?", help="the event log (CSV/TSV, Parquet, JSONL)")
    p.add_argument("--data", help="the event log, as `train` and `evaluate` take it (instead of LOG)")
    p.add_argument("--rate", default="max", help="events/s or 'max'")
    add_log_args(p)
    _broker_arg(p)

    p = sub.add_parser("tail", help="print recommendations as they arrive")
    _broker_arg(p)

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

    _contract_parsers(sub)  # schemas, dlq (tools/ops/dlq.py)

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
    p.add_argument("--live-max", type=float, default=0.0, metavar="EVENTS_PER_S",
                   help="the 100 %% of --loads in events/s (default: the worker's measured backfill max); "
                   "pins the offered rates so that two runs offer the same clicks")
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


# ---------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Command:
    """A subcommand: the dataclass its flags are read into, and the handler -> exit code, named
    "module:function" (imported when the command runs) or given as a light function of this module."""

    args: type[Args]
    run: str | Callable[[Any, Settings], int]

    def handler(self) -> Callable[[Any, Settings], int]:
        if callable(self.run):
            return self.run
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


OFFLINE = "livemb.tools.offline.commands"
COMMANDS: dict[str, Command] = {
    "synth": Command(SynthArgs, f"{OFFLINE}:run_synth"),
    "item-embeddings": Command(ItemEmbeddingsArgs, f"{OFFLINE}:run_item_embeddings"),
    "train": Command(TrainArgs, f"{OFFLINE}:run_train"),
    "evaluate": Command(EvaluateArgs, f"{OFFLINE}:run_evaluate"),
    "embed": Command(EmbedArgs, f"{OFFLINE}:run_embed"),
    "broker": Command(BrokerArgs, "livemb.tools.ops.kafka_commands:run_broker"),
    "worker": Command(WorkerArgs, "livemb.tools.ops.worker:run_worker"),
    "index": Command(IndexArgs, f"{OFFLINE}:run_index"),
    "replay": Command(ReplayArgs, "livemb.tools.ops.kafka_commands:run_replay"),
    "tail": Command(TailArgs, "livemb.tools.ops.kafka_commands:run_tail"),
    "rebuild-state": Command(RebuildArgs, "livemb.tools.ops.rebuild:run_rebuild"),
    "config": Command(ConfigArgs, "livemb.tools.ops.config_doc:run_config"),
    "schemas": Command(SchemasArgs, "livemb.tools.ops.dlq:run_schemas"),
    "dlq": Command(DlqArgs, "livemb.tools.ops.dlq:run_dlq"),
    "dashboard": Command(DashboardArgs, "livemb.tools.ops.dashboard:cmd_dashboard"),
    "demo": Command(DemoArgs, "livemb.tools.ops.demo:run_demo"),
    "soak": Command(SoakArgs, "livemb.tools.bench.soak:run_soak"),
    "bench": Command(BenchArgs, "livemb.tools.bench.bench:run_bench"),
}


def settings_for(args: Args) -> Settings:
    """Settings from a command's flags (unset ones: LIVEMB_* env, then the defaults)."""
    # A function-level import (tests/test_tools_layout.py): pydantic, which --help and --version
    # do not need, is a third of their start-up.
    from livemb.core.settings import load_settings

    return load_settings(**args.settings_overrides())


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = COMMANDS[ns.cmd]
    args = from_namespace(command.args, ns)
    for noisy in ("kafka", "aiokafka", "faust", "mode", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = settings_for(args)  # an invalid LIVEMB_* value or flag: ConfigError, one line
        hold_freed_memory(settings.malloc_hold_mb)  # before the command allocates its first large tensor
        return command.handler()(args, settings)
    except EXPECTED as e:  # one line, the exit code core/errors.py gives it; anything else is a bug: traceback
        print(f"livemb {ns.cmd}: error: {e}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
