"""The one typed settings object shared by every command.

Values come from, in order of precedence: command-line flags (the CLI passes them as keyword
arguments), `LIVEMB_*` environment variables, then the defaults below. Nothing else in the code
reads `os.environ` for configuration.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The choices of a setting, defined once: the CLI, the retriever and evaluation read them from here.
ExcludeSeen = Literal["none", "session", "history"]
EXCLUDE_SEEN: tuple[str, ...] = get_args(ExcludeSeen)
IndexKind = Literal["flat", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVEMB_", frozen=True, extra="forbid")

    # --- Kafka ---------------------------------------------------------------------------
    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "livemb"
    # Connection security (stream/security.py passes these to Faust/aiokafka and kafka-python).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None  # CA bundle that signed the brokers' certificates (default: system CAs)
    ssl_certfile: str | None = None  # client certificate (mutual TLS), with ssl_keyfile
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None  # masked in repr and logs
    topic_in: str = "interactions"
    topic_out: str = "recommendations"
    topic_dlq: str = "interactions.dlq"
    partitions: int = Field(4, ge=1)

    # --- micro-batching --------------------------------------------------------------------
    batch_max_events: int = Field(512, ge=1)
    batch_max_wait_ms: int = Field(50, ge=1)
    # longest a consumer fetch waits for data (faust's own default is 1500 ms; see stream/app.py)
    fetch_max_wait_ms: int = Field(50, ge=1)

    # --- event rules (SPEC section 2-3) ------------------------------------------------------
    session_gap_s: float = Field(1800.0, gt=0)
    max_lateness_s: float = Field(86400.0, ge=0)
    max_future_s: float = Field(86400.0, ge=0)
    max_payload_bytes: int = Field(64 * 1024, ge=1)
    dedupe_memory: int = Field(16, ge=1, description="event ids remembered per user")

    # --- model / retrieval ---------------------------------------------------------------
    model_path: str | None = None
    items_path: str | None = None
    topk: int = Field(20, ge=1)
    exclude_seen: ExcludeSeen = "none"
    index: IndexKind = "flat"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # One intra-op thread: on 2 cores with another busy process, torch with 2 threads collapsed
    # 40-300x in measurements (see docs/ARCHITECTURE.md).
    torch_threads: int = Field(1, ge=1)

    # --- worker ----------------------------------------------------------------------------
    data_dir: str = "runs/worker"
    web_port: int = Field(6066, ge=0, le=65535)
    web_host: str = "127.0.0.1"  # /metrics, /healthz, /readyz bind address
    # Consumer-group timeouts: short so a restarted worker gets its partitions back fast on the
    # embedded broker (faust sends no LeaveGroup on SIGTERM); see docs/STREAMING.md.
    session_timeout_s: float = Field(6.0, gt=0)
    # Tansu holds a JoinGroup for half the rebalance timeout before answering.
    rebalance_timeout_s: float = Field(4.0, gt=0)
    # Static group membership (KIP-345): a restarted worker with the same id takes its member slot
    # back at once instead of waiting out the dead session. None = dynamic membership.
    group_instance_id: str | None = None
    commit_interval_s: float = Field(1.0, gt=0)
    # How long the worker waits for an unreachable broker at start-up (retrying with backoff, one
    # log line per try, /readyz 503) before it exits non-zero. 0 = wait for ever (a supervised service).
    broker_wait_s: float = Field(0.0, ge=0)
    # Standby copies of other workers' table partitions: a survivor that already holds them takes
    # over without reading the whole changelog. 0 = none (one worker needs none).
    standby_replicas: int = Field(0, ge=0)

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


def load_settings(**overrides: object) -> Settings:
    """Build settings from env + explicit overrides (None values are ignored)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
