"""TLS/SASL settings reach both Kafka clients; secrets never show. Tansu 0.6.0 has no working TLS
listener here (docs/STREAMING.md), so the TLS check is a real handshake against a loopback TLS
server: kafka-python configured from the settings verifies the server's certificate with the CA."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from livemb.core.settings import Settings, load_settings
from livemb.stream.app import faust_config
from livemb.stream.security import faust_credentials, kafka_python_security

SECRET = "s3cr3t-pa55"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_plaintext_by_default() -> None:
    s = Settings()
    assert faust_credentials(s) is None and kafka_python_security(s) == {}
    assert faust_config(s)["broker_credentials"] is None


def test_sasl_ssl_from_the_environment(monkeypatch: pytest.MonkeyPatch, cert) -> None:
    ca, _ = cert
    for k, v in {"SECURITY_PROTOCOL": "SASL_SSL", "SSL_CAFILE": str(ca), "SASL_MECHANISM": "SCRAM-SHA-512",
                 "SASL_USERNAME": "svc-livemb", "SASL_PASSWORD": SECRET}.items():
        monkeypatch.setenv("LIVEMB_" + k, v)
    s = load_settings()
    creds = faust_config(s)["broker_credentials"]
    assert creds.protocol.value == "SASL_SSL" and creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.username == "svc-livemb" and creds.password == SECRET and creds.ssl_context is not None
    kw = kafka_python_security(s)
    assert kw == {"security_protocol": "SASL_SSL", "ssl_cafile": str(ca), "ssl_check_hostname": True,
                  "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc-livemb",
                  "sasl_plain_password": SECRET}
    for shown in (repr(s), str(s), s.model_dump_json(), repr(creds)):  # what could reach a log
        assert SECRET not in shown


def test_incomplete_security_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="needs sasl_username and sasl_password"):
        Settings(security_protocol="SASL_PLAINTEXT", sasl_username="u")
    with pytest.raises(ValueError, match="go together"):
        Settings(security_protocol="SSL", ssl_certfile="/x/cert.pem")


def tls_server(cert: Path, key: Path) -> tuple[int, list[str], threading.Thread]:
    """Accepts one connection on loopback and records whether the TLS handshake completed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(20)
    seen: list[str] = []

    def serve() -> None:
        try:
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.version() or "?")
        except (ssl.SSLError, OSError) as e:
            seen.append(f"failed: {type(e).__name__}")
        finally:
            srv.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return srv.getsockname()[1], seen, th


@pytest.mark.parametrize("trusted", [True, False])
def test_kafka_python_speaks_tls_with_the_configured_ca(cert, tmp_path: Path, trusted: bool) -> None:
    from kafka import KafkaAdminClient

    ca, key = cert
    if not trusted:  # another self-signed CA: the client must refuse the server's certificate
        other = tmp_path / "other.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                        "-out", str(other), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        ca = other
    port, seen, th = tls_server(cert[0], key)
    s = Settings(security_protocol="SSL", ssl_cafile=str(ca))
    with pytest.raises(Exception):  # noqa: B017 - the fake server speaks TLS but not Kafka
        KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000,
                         bootstrap_timeout_ms=2000, **kafka_python_security(s))
    th.join(20)
    assert seen and (seen[0].startswith("TLS") if trusted else seen[0].startswith("failed"))
