"""The typed arguments of every `livemb` command, built once from argparse's Namespace.

tools/cli.py declares the flags (names, defaults, help); each command gets one frozen dataclass
here whose fields are those flags' destinations, grouped where several commands share a set
(`LogFormat`, `SettingsFlags`, `TrainFlags`). `from_namespace` fills a dataclass from the parsed
Namespace, nested groups from the same flat Namespace, and fails on a missing flag; the test
tests/test_tools_layout.py checks the other way round (no flag that no field reads).
`settings_overrides()` is what a command's flags set in `core.settings.Settings`.

This module and tools/cli.py import no torch, pandas or faust: `livemb --help` stays fast, and the
handlers (resolved by name at dispatch) import what they need.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from livemb.core.errors import ConfigError

if TYPE_CHECKING:
    from livemb.core.settings import Settings

A = TypeVar("A")


def from_namespace(cls: type[A], ns: argparse.Namespace) -> A:
    """`cls` with every field read from `ns` (a dataclass-typed field: built from `ns` too)."""
    values, hints = vars(ns), typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        t = hints[f.name]
        kw[f.name] = from_namespace(t, ns) if dataclasses.is_dataclass(t) else values[f.name]
    return cls(**kw)


def flag_fields(cls: type) -> set[str]:
    """Every Namespace destination `from_namespace(cls, ...)` reads."""
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out |= flag_fields(t) if dataclasses.is_dataclass(t) else {f.name}
    return out


def add_log_args(p: argparse.ArgumentParser) -> None:
    """The flags that say how to read an event log (tools/data/eventlog: `parse_columns`, `read_log`)."""
    p.add_argument("--columns", help="column mapping, e.g. user=SessionId,item=ItemId,ts=Time")
    p.add_argument("--ts-unit", choices=["s", "ms"], default="ms")


@dataclass(frozen=True)
class LogFormat:
    """How to read an event log (`add_log_args`)."""

    columns: str | None = None
    ts_unit: str = "ms"


@dataclass(frozen=True)
class SettingsFlags:
    """The flags every broker- or model-facing command shares; unset ones leave the env/defaults."""

    broker: str | None = None
    device: str | None = None
    topk: int | None = None
    exclude_seen: str | None = None
    repeat_path: str | None = None
    open_catalogue: bool | None = None
    new_item_vectors: bool | None = None
    index: str | None = None
    session_gap_s: float | None = None

    def overrides(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BrokerFlags:
    """The one settings flag of the commands that only produce or consume a topic (`replay`, `tail`)."""

    broker: str | None = None

    def overrides(self) -> dict[str, Any]:
        return {"broker": self.broker}


@dataclass(frozen=True)
class TrainFlags:
    """The training flags of `train` and `evaluate`; unset (None): models.train.TrainConfig's default."""

    epochs: int | None
    valid_fraction: float | None
    patience: int | None
    min_steps: int | None
    valid_metric: str | None
    valid_min_gain_se: float | None
    refit: bool | None
    weight_average: float | None
    choose_rule: bool | None
    calibrate_gate: bool | None
    slot_prefit_steps: int | None
    loss: str | None
    batch_size: int | None
    lr: float | None
    seed: int | None
    dim: int
    repeat: str | None
    recent_items: int | None
    item_vectors: str

    def config_fields(self) -> dict[str, Any]:
        """The models.train.TrainConfig fields the command line set (the rest keep their defaults)."""
        fields = {"epochs": self.epochs, "loss": self.loss, "batch_size": self.batch_size, "lr": self.lr,
                  "valid_fraction": self.valid_fraction, "patience": self.patience,
                  "min_steps": self.min_steps,
                  "valid_metric": self.valid_metric, "valid_min_gain_se": self.valid_min_gain_se,
                  "refit": self.refit, "weight_average": self.weight_average, "choose_rule": self.choose_rule,
                  "calibrate_gate": self.calibrate_gate, "slot_prefit_steps": self.slot_prefit_steps, "seed": self.seed}
        return {k: v for k, v in fields.items() if v is not None}

    def model_overrides(self, settings: Settings) -> dict[str, Any]:
        """ModelConfig fields set from the command line and settings."""
        out: dict[str, Any] = {"session_gap_ms": int(settings.session_gap_s * 1000)}
        if self.repeat is not None:
            out["repeat"] = self.repeat
        if self.recent_items is not None:
            out["recent_items"] = self.recent_items
        return out


class Args:
    """A command's arguments: `settings_overrides` are the Settings fields its flags set."""

    def settings_overrides(self) -> dict[str, Any]:
        return {}


class SettingsArgs(Args):
    """A command with settings flags (its dataclass has a `settings: SettingsFlags` field, or
    `BrokerFlags` for a command that only talks to a topic)."""

    settings: SettingsFlags

    def settings_overrides(self) -> dict[str, Any]:
        return self.settings.overrides()


@dataclass(frozen=True)
class SynthArgs(Args):
    profile: str
    users: int | None
    items: int | None
    days: int | None
    dim: int
    seed: int
    out: str
    items_out: str | None
    cart_return: float


@dataclass(frozen=True)
class ItemEmbeddingsArgs(Args):
    data: str
    dim: int
    item_vectors: str
    out: str
    log_format: LogFormat


@dataclass(frozen=True)
class TrainArgs(SettingsArgs):
    data: str
    model: str
    items: str | None
    out: str
    log_format: LogFormat
    train: TrainFlags
    settings: SettingsFlags


@dataclass(frozen=True)
class EvaluateArgs(SettingsArgs):
    data: str
    items: str | None
    models: str | None
    json: str | None
    plot: str | None
    test_frac: float
    max_users: int | None
    drop_event_types: bool
    log_format: LogFormat
    train: TrainFlags
    settings: SettingsFlags


@dataclass(frozen=True)
class EmbedArgs(SettingsArgs):
    data: str
    model: str
    items: str
    out: str
    log_format: LogFormat
    settings: SettingsFlags


@dataclass(frozen=True)
class BrokerArgs(Args):
    port: int


@dataclass(frozen=True)
class WorkerArgs(SettingsArgs):
    model: str | None
    items: str | None
    processor: str | None
    data_dir: str | None
    web_port: int | None
    partitions: int | None
    batch_max_events: int | None
    batch_max_wait_ms: int | None
    reload_check_s: float | None
    standby_replicas: int | None
    index_path: str | None
    shadow_model: str | None
    shadow_items: str | None
    shadow_publish: bool | None
    loglevel: str
    settings: SettingsFlags

    def settings_overrides(self) -> dict[str, Any]:
        return {**self.settings.overrides(), "model_path": self.model, "items_path": self.items,
                "shadow_model_path": self.shadow_model, "shadow_items_path": self.shadow_items,
                "shadow_publish": self.shadow_publish,
                "data_dir": self.data_dir, "web_port": self.web_port, "partitions": self.partitions,
                "batch_max_events": self.batch_max_events, "batch_max_wait_ms": self.batch_max_wait_ms,
                "reload_check_s": self.reload_check_s, "standby_replicas": self.standby_replicas,
                "index_path": self.index_path}


@dataclass(frozen=True)
class IndexArgs(Args):
    items: str
    index: str
    param: list[str]
    out: str


@dataclass(frozen=True)
class ReplayArgs(SettingsArgs):
    log: str | None
    data: str | None
    rate: str
    log_format: LogFormat
    settings: BrokerFlags  # type: ignore[assignment]

    @property
    def source(self) -> str:
        """The event log: LOG or --data LOG (one of them, not both)."""
        if (self.log is None) == (self.data is None):
            raise ConfigError("replay needs the event log once: `livemb replay LOG` or `livemb replay --data LOG`")
        return self.log or self.data


@dataclass(frozen=True)
class TailArgs(SettingsArgs):
    settings: BrokerFlags  # type: ignore[assignment]


@dataclass(frozen=True)
class RebuildArgs(SettingsArgs):
    from_beginning: bool
    from_timestamp: str | None
    model: str | None
    items: str | None
    processor: str | None
    app_id: str | None
    data_dir: str | None
    scratch_topic: str | None
    switch_file: str | None
    partitions: int | None
    timeout_s: float
    settings: SettingsFlags

    def settings_overrides(self) -> dict[str, Any]:
        return {**self.settings.overrides(), "data_dir": self.data_dir, "partitions": self.partitions}


@dataclass(frozen=True)
class ConfigArgs(Args):
    pass


@dataclass(frozen=True)
class DashboardArgs(Args):
    prometheus: str
    out: str
    range: str
    window: str
    job: str


@dataclass(frozen=True)
class DemoArgs(SettingsArgs):
    data: str | None
    model: str | None
    items: str | None
    offline: bool
    workdir: str
    dashboard: str | None
    log_format: LogFormat
    settings: SettingsFlags


@dataclass(frozen=True)
class SoakArgs(SettingsArgs):
    seconds: float
    load: float
    every: float
    max_events: int
    model: str | None
    items: str | None
    json: str | None
    workdir: str
    log_format: LogFormat
    settings: SettingsFlags


@dataclass(frozen=True)
class BenchArgs(SettingsArgs):
    users: int
    items_n: int
    days: float
    train_events: int
    loads: list[float]
    step_seconds: float
    live_max: float
    soak: float
    soak_load: float
    big_items: int
    big_index: str
    quick: bool
    retrieval_sizes: list[int]
    skip_offline: bool
    data: str | None
    model: str | None
    items: str | None
    json: str
    plot: str
    workdir: str
    settings: SettingsFlags


@dataclass(frozen=True)
class SchemasArgs(Args):
    out: str
    check: bool


@dataclass(frozen=True)
class DlqArgs(Args):
    action: str
    broker: str | None
    reason: str | None
    n: int
    jsonl: bool
    idle_s: float
    since: str | None
    from_offset: int | None
    from_file: str | None
    dry_run: bool

    def settings_overrides(self) -> dict[str, Any]:
        return {"broker": self.broker}
