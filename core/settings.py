"""The one typed settings object shared by every command.

Values come from, in order of precedence: command-line flags (the CLI passes them as keyword
arguments), `LIVEMB_*` environment variables, then the defaults below. Nothing else in the code
reads `os.environ` for configuration.

`load_settings` turns an invalid value into one ConfigError line that names the variable (or flag)
and the problem, and warns once about a `LIVEMB_*` variable that is no setting (a misspelling would
otherwise be ignored silently), naming the closest one.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from livemb.core.choices import ExcludeSeen, IndexKind, RepeatPath  # the choices of a setting, defined once
from livemb.core.errors import ConfigError

ENV_PREFIX = "LIVEMB_"
log = logging.getLogger("livemb.settings")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- Kafka ---------------------------------------------------------------------------
    broker: str = Field("kafka://127.0.0.1:9092", description="Kafka bootstrap servers, Faust style (kafka://host:port, ';'-separated for several)")
    app_id: str = Field("livemb", description="Faust app id: the consumer group, and the prefix of the state table's changelog topic")
    # Connection security (stream/security.py passes these to Faust/aiokafka and kafka-python).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    ssl_cafile: str | None = Field(None, description="CA bundle that signed the brokers' certificates (unset: system CAs)")
    ssl_certfile: str | None = Field(None, description="client certificate for mutual TLS, with ssl_keyfile")
    ssl_keyfile: str | None = Field(None, description="private key of ssl_certfile")
    ssl_check_hostname: bool = Field(True, description="verify that the broker certificate matches its host name")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str | None = Field(None, description="SASL user (required with SASL_*)")
    sasl_password: SecretStr | None = Field(None, description="SASL password (required with SASL_*; masked in repr and logs)")
    topic_in: str = Field("interactions", description="input topic of click events (key = user_id)")
    topic_out: str = Field("recommendations", description="output topic: one message per user per micro-batch")
    topic_dlq: str = Field("interactions.dlq", description="dead-letter topic for invalid events (with the reason)")
    partitions: int = Field(4, ge=1, description="partitions of the input/output topics and the state table")
    # Durability of the topics the worker and `livemb rebuild-state` create (the state table's
    # changelog, the rebuild's scratch output): the defaults suit a cluster of 3+ brokers. Outputs
    # and the changelog are produced with acks=all, so a write is acknowledged only once
    # topic_min_insync replicas hold it. See docs/STREAMING.md "Topic durability".
    broker_kind: Literal["kafka", "embedded"] = Field(
        "kafka", description="kafka: a Kafka cluster (Faust's recovery consistency check on); embedded: the embedded "
        "broker of livemb broker/demo/tests (its ListOffsets end is low, so the check is off, and the two topic "
        "settings below default to 1)")
    topic_replication: int = Field(
        3, ge=1, description="replication factor of the topics the worker creates (the state changelog included); "
        "1 by default with broker_kind=embedded")
    topic_min_insync: int = Field(
        2, ge=1, description="min.insync.replicas of those topics: with acks=all a write needs this many copies "
        "(at most topic_replication); 1 by default with broker_kind=embedded")

    # --- micro-batching --------------------------------------------------------------------
    batch_max_events: int = Field(512, ge=1, description="largest micro-batch (events)")
    batch_max_wait_ms: int = Field(50, ge=1, description="longest a micro-batch waits to fill up (ms)")
    # faust's own default is 1500 ms; see stream/app.py. Tansu holds a fetch that found nothing
    # for the whole wait even when data arrives meanwhile: events waited ~wait/2 before the agent
    # saw them (live at 600/s: p50 182 ms at 50, 156 ms at 10). A correct broker answers as soon as
    # data arrives, so a low wait only adds idle fetches (100/s per broker connection at 10).
    fetch_max_wait_ms: int = Field(
        10, ge=1, description="how long a consumer fetch waits for data (ms); raised towards fetch_max_wait_cap_ms "
        "only while the broker returns nothing that it holds")
    # Tansu also stops looking for records when the wait is up, and its look grows with the
    # partition: the worker raises the wait while the broker returns nothing it has
    # (stream/fetch_wait.py), up to this.
    fetch_max_wait_cap_ms: int = Field(
        1000, ge=1, description="highest fetch wait the worker raises to while the broker returns nothing that it "
        "holds (ms)")
    # aiokafka's 16 KiB default holds ~6 output messages (2.6 KB each): every further send waited
    # for a broker round trip, 0.5-0.8 ms per message (docs/BENCHMARKS.md). Kept under the
    # broker's default message.max.bytes (1 MiB).
    producer_batch_bytes: int = Field(
        512 * 1024, ge=16 * 1024, le=1_000_000,
        description="producer batch per partition (bytes): outputs, changelog and DLQ records"
    )

    # --- event rules (SPEC section 2-3) ------------------------------------------------------
    session_gap_s: float = Field(1800.0, gt=0, description="inactivity (event time) that starts a new session (s)")
    max_lateness_s: float = Field(86400.0, ge=0, description="events older than the user's last event by more than this go to the DLQ as too_late (s)")
    max_future_s: float = Field(86400.0, ge=0, description="events stamped further than this in the future are invalid (s)")
    max_payload_bytes: int = Field(64 * 1024, ge=1, description="larger input messages are invalid (bytes)")
    dedupe_memory: int = Field(16, ge=1, description="event ids remembered per user")

    # --- model / retrieval ---------------------------------------------------------------
    model_path: str | None = Field(None, description="checkpoint served by the worker (livemb train); --model")
    items_path: str | None = Field(None, description="items.npz the checkpoint was trained with; --items")
    topk: int = Field(20, ge=1, description="candidates per output message")
    # unset: what the checkpoint chose on the held-out tail of its training data (models/early_stop.py)
    exclude_seen: ExcludeSeen | None = Field(
        None, description="remove seen items from the candidates: none, session or history (unset: the checkpoint's choice)")
    repeat_path: RepeatPath | None = Field(
        None, description="served repeat path: rep (the model's own), rule (recent items first) or norep (unset: the "
        "checkpoint's choice)")
    open_catalogue: bool = Field(
        True, description="items absent from the item table enter each user's repeat memory (a pool of 8 new items "
        "per user, keyed by a hash of the id, scored by the repeat path only, never in the faiss index); off: they "
        "are only counted as unknown_item")
    new_item_vectors: bool = Field(
        False, description="with open_catalogue: a new item that co-occurs in sessions with known items gets the "
        "mean of their vectors and joins an exact explore extension beside the index, the same on every worker "
        "(models/newvectors.py); livemb evaluate also ranks with it. Off by default: on taobao-dev it did not "
        "help (docs/MODELS.md)")
    new_item_min_evidence: int = Field(
        3, ge=1, description="co-occurrences with known items a new item needs before it gets a vector")
    new_item_window: int = Field(
        3, ge=1, le=8, description="a new item and a known item co-occur when at most this many events apart in one "
        "session (at most 8: the new-item pool's slots)")
    new_item_topic: str = Field(
        "new-item-evidence", description="topic of the new items' co-occurrence pairs (ONE partition): every "
        "worker publishes its batches' pairs and folds the whole topic, so all hold the same explore extension")
    new_item_cap: int = Field(
        50_000, ge=1, description="new items whose evidence is kept (least recently touched evicted first)")
    index: IndexKind = Field("flat", description="faiss index of the explore path: flat (exact), hnsw or ivfpq")
    index_path: str | None = Field(
        None, description="prebuilt faiss index (livemb index) loaded at start instead of building one; it must match "
        "the items and --index (unset: build at start)")
    device: str = Field("auto", description="torch device: auto (cuda when present), cpu, cuda or cuda:N")
    # On 2 cores with another busy process, torch with 2 threads collapsed 40-300x in
    # measurements (see docs/ARCHITECTURE.md).
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads")
    malloc_hold_mb: int = Field(
        1024, ge=0, description="freed memory (MiB) the process keeps for reuse instead of returning it to the OS "
        "(glibc's mmap and trim thresholds, core/allocator.py: a training step ~1.8x faster); 0: glibc's defaults")
    idle_sweep_s: float = Field(
        5.0, ge=0, description="seconds between idle-session sweeps (sessions idle past session_gap_s in event "
        "time get a next-session message); 0 turns the sweep off"
    )
    idle_sweep_max_sessions: int = Field(
        64, ge=1, description="most idle sessions one sweep closes; more due go on after the next batch (bounds "
        "how long a sweep holds up the agent when event time jumps)"
    )
    idle_sweep_max_defer_s: float = Field(
        60.0, ge=0, description="while the worker is behind (consumer lag above one full batch) sweeps wait for it "
        "to catch up, at most this long (s): fresh events first, and a user who comes back in the backlog needs "
        "no close message"
    )
    reload_check_s: float = Field(
        2.0, gt=0, description="seconds between checks of the checkpoint/items mtimes for a hot swap; SIGHUP checks at once"
    )
    # A challenger stepped on the same batches as the served model (stream/shadow.py); its state
    # rows live in the same table rows, its online metrics carry model="shadow".
    shadow_model_path: str | None = Field(
        None, description="challenger checkpoint stepped in shadow beside --model: its own state, the same online "
        "metrics with model=\"shadow\", nothing published to the output topic; --shadow-model (unset: no shadow)")
    shadow_items_path: str | None = Field(
        None, description="items.npz of the shadow checkpoint; --shadow-items (unset: the items of --model)")
    shadow_publish: bool = Field(
        False, description="also publish the shadow's messages, to the topic named topic_out + \".shadow\" "
        "(recommendations.shadow by default; off: the shadow publishes nothing)")

    # --- worker ----------------------------------------------------------------------------
    data_dir: str = Field("runs/worker", description="RocksDB state directory of the worker (created if missing)")
    web_port: int = Field(6066, ge=0, le=65535, description="port of /metrics, /healthz, /readyz (0: any free port)")
    web_host: str = Field("127.0.0.1", description="bind address of /metrics, /healthz, /readyz (0.0.0.0 in a container)")
    # stream/health.py: the agent hung (an await that never returns) or the event loop blocked.
    healthz_stall_s: float = Field(
        60.0, ge=0, description="/healthz answers 503 when no batch finished for this long while input waits (lag > 0 "
        "on an assigned partition of a ready worker), or when the worker's event loop ran no timer for this long "
        "(s); 0 turns the check off"
    )
    debug_stall_after_batches: int | None = Field(
        None, ge=0, description="TEST ONLY, never in production: after this many batches the agent hangs for ever "
        "(timers, heartbeats and HTTP go on), to test /healthz and the lag metric (unset: off)"
    )
    # Short so a restarted worker gets its partitions back fast on the embedded broker (faust
    # sends no LeaveGroup on SIGTERM); see docs/STREAMING.md. Use ~30 s on a real Kafka.
    session_timeout_s: float = Field(6.0, gt=0, description="consumer-group session timeout (s)")
    # Tansu holds a JoinGroup for half the rebalance timeout before answering.
    rebalance_timeout_s: float = Field(4.0, gt=0, description="consumer-group rebalance timeout (s)")
    # KIP-345: a restarted worker with the same id takes its member slot back at once instead of
    # waiting out the dead session.
    group_instance_id: str | None = Field(None, description="static group membership id, unique per worker (unset: dynamic membership)")
    commit_interval_s: float = Field(1.0, gt=0, description="how often consumer offsets are committed (s)")
    # Retrying with backoff, one log line per try, /readyz 503, then exit non-zero.
    broker_wait_s: float = Field(0.0, ge=0, description="how long the worker waits for an unreachable broker at start-up (s; 0: for ever, for a supervised service)")
    # Standby copies of other workers' table partitions: a survivor that already holds them takes
    # over without reading the whole changelog.
    standby_replicas: int = Field(0, ge=0, description="standby copies of other workers' state partitions (0: none; one worker needs none)")

    @model_validator(mode="before")
    @classmethod
    def _embedded_topics_default_to_one_copy(cls, data: Any) -> Any:
        """The embedded broker is one node: unless given, its topics get 1 replica, 1 in sync."""
        if isinstance(data, dict) and data.get("broker_kind") == "embedded":
            return {"topic_replication": 1, "topic_min_insync": 1, **data}
        return data

    @model_validator(mode="after")
    def _min_insync_fits(self) -> Settings:
        if self.topic_min_insync > self.topic_replication:
            raise ValueError(f"topic_min_insync {self.topic_min_insync} > topic_replication {self.topic_replication}: "
                             "no write could ever be acknowledged")
        return self

    @model_validator(mode="after")
    def _fetch_wait_fits(self) -> Settings:
        if self.fetch_max_wait_cap_ms < self.fetch_max_wait_ms:
            raise ValueError(f"fetch_max_wait_cap_ms {self.fetch_max_wait_cap_ms} < fetch_max_wait_ms "
                             f"{self.fetch_max_wait_ms}: the cap is the highest the wait may be raised to")
        return self

    @model_validator(mode="after")
    def _shadow_is_complete(self) -> Settings:
        if (self.shadow_items_path or self.shadow_publish) and not self.shadow_model_path:
            raise ValueError("shadow_items_path and shadow_publish need shadow_model_path (--shadow-model)")
        return self

    @property
    def topic_shadow(self) -> str:
        """Where the shadow's messages go with shadow_publish."""
        return f"{self.topic_out}.shadow"

    def topic_config(self) -> dict[str, str]:
        """Kafka topic configs of every topic the worker (or rebuild-state) creates."""
        return {"min.insync.replicas": str(self.topic_min_insync)}

    @model_validator(mode="after")
    def _security_is_complete(self) -> Settings:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        return self

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


_SECRET = {n for n, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)}
_warned: set[str] = set()


def unknown_env(environ: Mapping[str, str]) -> dict[str, str | None]:
    """`LIVEMB_*` variables that are no setting -> the closest setting's variable (None: none close).
    Matched without regard to case, as pydantic-settings reads them."""
    known = [n.upper() for n in Settings.model_fields]
    out: dict[str, str | None] = {}
    for key in environ:
        name = key.upper()
        if name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX) not in known:
            # compared without the prefix, which every name shares
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), known, n=1, cutoff=0.6)
            out[key] = ENV_PREFIX + close[0] if close else None
    return out


def _warn_unknown_env() -> None:
    for key, close in unknown_env(os.environ).items():
        if key not in _warned:
            _warned.add(key)
            hint = f"did you mean {close}?" if close else "`livemb config` lists the settings"
            log.warning("unknown environment variable %s is ignored (%s)", key, hint)


def _problem(err: dict, overrides: Mapping[str, object]) -> str:
    """One pydantic error as 'SOURCE=VALUE: problem', SOURCE the flag or the LIVEMB_* variable."""
    if not err["loc"]:  # a rule across fields (model_validator)
        return str(err["msg"]).removeprefix("Value error, ")
    field = str(err["loc"][0])
    source = f"--{field.replace('_', '-')}" if field in overrides else env_name(field)
    value = "" if field in _SECRET or isinstance(err.get("input"), dict) else f"={err.get('input')!r}"
    return f"{source}{value}: {err['msg'][:1].lower()}{err['msg'][1:]}"


def load_settings(**overrides: object) -> Settings:
    """Build settings from env + explicit overrides (None values are ignored).

    Raises ConfigError (one line: every invalid value with its variable or flag)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    _warn_unknown_env()
    try:
        return Settings(**given)
    except ValidationError as e:
        raise ConfigError("invalid settings: " + "; ".join(_problem(err, given) for err in e.errors())) from None
    except SettingsError as e:  # a value pydantic-settings could not even parse
        raise ConfigError(f"invalid settings: {e}") from None
