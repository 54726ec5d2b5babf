"""The embedded Tansu broker: lifecycle by PID, topics, and the ListOffsets fact we design around."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from livemb.stream.broker import BrokerError, EmbeddedBroker

pytestmark = pytest.mark.integration


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_start_stop_by_pid(tmp_path: Path) -> None:
    with EmbeddedBroker(data_dir=tmp_path) as b:
        pid = b.pid
        assert pid and _pid_alive(pid)
        assert b.url == f"kafka://127.0.0.1:{b.port}" and b.bootstrap == f"127.0.0.1:{b.port}"
        with socket.create_connection(("127.0.0.1", b.port), timeout=2):
            pass
    assert not _pid_alive(pid)
    assert b.pid is None
    b.stop()  # idempotent


def test_create_topics_and_metadata(tmp_path: Path) -> None:
    from kafka import KafkaConsumer

    with EmbeddedBroker(data_dir=tmp_path) as b:
        b.create_topics(["a", "b"], partitions=4)
        b.create_topics(["a"], partitions=4)  # existing: no error
        c = KafkaConsumer(bootstrap_servers=b.bootstrap)
        try:
            assert c.partitions_for_topic("a") == {0, 1, 2, 3}
            assert c.partitions_for_topic("b") == {0, 1, 2, 3}
        finally:
            c.close()


def test_port_in_use_fails_with_broker_output(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        b = EmbeddedBroker(port=s.getsockname()[1], data_dir=tmp_path, start_timeout_s=5)
        with pytest.raises(BrokerError) as ei:
            b.start()
        assert "tansu" in str(ei.value)
        assert b.proc is None
    finally:
        s.close()


def test_list_offsets_fact(tmp_path: Path) -> None:
    """Tansu 0.6.0 reports base offset of the last batch + 1 as the end; fetch high-water is right."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    with EmbeddedBroker(data_dir=tmp_path) as b:
        b.create_topics(["facts"], partitions=1)
        p = KafkaProducer(bootstrap_servers=b.bootstrap, linger_ms=50)
        true_end = 0
        for n in (1, 1, 5, 10):
            for i in range(n):
                p.send("facts", value=b"x%d" % i)
            p.flush()
            true_end += n
        p.close()
        tp = TopicPartition("facts", 0)
        c = KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False, group_id=None)
        try:
            reported = c.end_offsets([tp])[tp]
            c.assign([tp])
            c.seek_to_beginning(tp)
            got = sum(len(v) for v in c.poll(5000, max_records=1000).values())
            hw = c.highwater(tp)
        finally:
            c.close()
        assert got == true_end == 17
        assert hw == true_end
        assert reported <= true_end  # measured: 8 (the last batch's base offset + 1)
