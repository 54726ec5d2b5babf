"""TLS and SASL for the broker connection, from the one settings object, for both Kafka clients:
Faust/aiokafka (`faust_credentials`) and kafka-python (`kafka_python_security`: gap repair,
recovery ends, replay, tail, the start-up probe). Secrets stay in `SecretStr` and never reach a log
(the settings' repr masks them; nothing here logs)."""

from __future__ import annotations

import ssl
from typing import Any

from livemb.core.settings import Settings


def ssl_context(s: Settings) -> ssl.SSLContext | None:
    if s.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.ssl_cafile)
    if s.ssl_certfile:
        ctx.load_cert_chain(s.ssl_certfile, s.ssl_keyfile)
    if not s.ssl_check_hostname:
        ctx.check_hostname = False
    return ctx


def faust_credentials(s: Settings) -> Any:
    """Faust's `broker_credentials` (None for PLAINTEXT)."""
    import faust

    if s.security_protocol == "PLAINTEXT":
        return None
    if s.security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context(s))
    return faust.SASLCredentials(
        username=s.sasl_username,
        password=s.sasl_password.get_secret_value() if s.sasl_password else None,
        mechanism=s.sasl_mechanism,
        ssl_context=ssl_context(s),
    )


def kafka_python_security(s: Settings) -> dict[str, Any]:
    """Keyword arguments for every kafka-python client (empty for PLAINTEXT)."""
    if s.security_protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": s.security_protocol}
    if s.security_protocol in ("SSL", "SASL_SSL"):
        out.update(ssl_cafile=s.ssl_cafile, ssl_certfile=s.ssl_certfile, ssl_keyfile=s.ssl_keyfile,
                   ssl_check_hostname=s.ssl_check_hostname)
    if s.security_protocol.startswith("SASL"):
        out.update(sasl_mechanism=s.sasl_mechanism, sasl_plain_username=s.sasl_username,
                   sasl_plain_password=s.sasl_password.get_secret_value() if s.sasl_password else None)
    return {k: v for k, v in out.items() if v is not None}
