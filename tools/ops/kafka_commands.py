"""The commands that talk to Kafka without the worker: `livemb broker`, `replay` and `tail`."""

from __future__ import annotations

from livemb.core.errors import ConfigError
from livemb.core.settings import Settings
from livemb.stream.broker import run_broker_foreground
from livemb.stream.kafka_io import replay, tail
from livemb.stream.security import kafka_python_security
from livemb.tools.args import BrokerArgs, ReplayArgs, TailArgs
from livemb.tools.data.eventlog import load_log


def run_broker(a: BrokerArgs, settings: Settings) -> int:
    return run_broker_foreground(a.port)


def _rate(text: str) -> float | None:
    """`replay --rate`: events/s, or None for 'max'."""
    try:
        return None if text == "max" else float(text)
    except ValueError:
        raise ConfigError(f"--rate {text!r}: expected events/s or 'max'") from None


def run_replay(a: ReplayArgs, settings: Settings) -> int:
    df = load_log(a.source, a.log_format.columns, a.log_format.ts_unit)
    replay(df, settings.broker, settings.topic_in, _rate(a.rate), security=kafka_python_security(settings))
    return 0


def run_tail(a: TailArgs, settings: Settings) -> int:
    tail(settings.broker, settings.topic_out, security=kafka_python_security(settings))
    return 0
