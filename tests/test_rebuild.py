"""`livemb rebuild-state` against the embedded broker: a fresh table from a timestamp or from the
beginning, outputs kept off `recommendations`, and the switch-over continuing on the rebuilt state."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest

from livemb.stream.broker import free_port
from livemb.tools.cli import main
from livemb.tools.harness import EMBEDDED_WORKER_ENV
from tests.conftest import ROOT, WorkerProc, consume_all, event, produce, wait_until

T0 = 1_700_000_000_000


def _table(broker, data_dir, tmp_path) -> dict[str, int]:
    from livemb.state.guard import unwrap
    from livemb.state.record import decode

    rows = WorkerProc(broker, data_dir, tmp_path).read_table()
    return {u: int(decode(unwrap(env, 16)[1])[1]["count"]) for u, (_, env) in rows.items()}


@pytest.mark.integration
def test_rebuild_from_timestamp_and_from_beginning_then_switch_over(broker, tmp_path, monkeypatch):
    for k, v in EMBEDDED_WORKER_ENV.items():  # rebuild-state passes the broker kind on to its worker
        monkeypatch.setenv(k, v)
    broker.create_topics(["interactions", "recommendations"], partitions=4)
    broker.create_topics(["interactions.dlq"], partitions=1)
    produce(broker.bootstrap, [event(f"u{u}", k, T0 + k * 1000, event_id=f"a{u}-{k}") for k in range(5) for u in range(10)])
    time.sleep(1.5)
    t_split = int(time.time() * 1000)
    time.sleep(0.5)
    produce(broker.bootstrap, [event(f"u{u}", k, T0 + 10_000 + k * 1000, event_id=f"b{u}-{k}")
                               for k in range(3) for u in range(5)])
    common = ["--processor", "tests.counting:make_processor", "--broker", broker.url, "--partitions", "4"]

    env_file = tmp_path / "switch.env"
    rc = main(["rebuild-state", "--from-timestamp", str(t_split), "--app-id", "livemb-v2",
               "--data-dir", str(tmp_path / "v2"), "--switch-file", str(env_file), *common])
    assert rc == 0
    assert _table(broker, tmp_path / "v2", tmp_path) == {f"u{u}": 3 for u in range(5)}
    rc = main(["rebuild-state", "--from-beginning", "--app-id", "livemb-v3", "--data-dir", str(tmp_path / "v3"),
               *common])
    assert rc == 0
    assert _table(broker, tmp_path / "v3", tmp_path) == {f"u{u}": 8 if u < 5 else 5 for u in range(10)}
    assert consume_all(broker.bootstrap, "recommendations") == [], "backfill outputs must not reach consumers"
    assert len(consume_all(broker.bootstrap, "recommendations.livemb-v2")) >= 5

    # switch over: a worker started with the env file continues on the rebuilt table and offsets
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert values["LIVEMB_APP_ID"] == "livemb-v2" and values["LIVEMB_DATA_DIR"] == str((tmp_path / "v2").resolve())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEMB_")} | EMBEDDED_WORKER_ENV | values
    cmd = [sys.executable, "-m", "livemb.tools.cli", "worker", *common, "--web-port", str(port)]
    log = open(tmp_path / "switched.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        produce(broker.bootstrap, [event("u0", 99, T0 + 60_000, event_id="c0")])

        def counted() -> int | None:
            msgs = [orjson.loads(m.value) for m in consume_all(broker.bootstrap, "recommendations", idle_s=0.5)]
            return next((m["count"] for m in msgs if m["user_id"] == "u0"), None)

        assert wait_until(counted, 90, "the switched worker's first output") == 4  # 3 rebuilt + 1 new
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_rebuild_setup_mistakes_are_one_line(capsys):
    assert main(["rebuild-state", "--model", "m.pt", "--items", "i.npz"]) == 2
    assert "--from-beginning or --from-timestamp" in capsys.readouterr().err
    assert main(["rebuild-state", "--from-beginning"]) == 2
    assert "needs --model" in capsys.readouterr().err
