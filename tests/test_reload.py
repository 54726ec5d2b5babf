"""stream.reload.FileWatch: when the served files changed, a refused set is not retried, counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from livemb.stream.reload import FileWatch


def files(tmp_path: Path) -> tuple[str, str]:
    a, b = tmp_path / "model.pt", tmp_path / "items.npz"
    a.write_bytes(b"m")
    b.write_bytes(b"i")
    return str(a), str(b)


def touch(path: str, t: float) -> None:
    os.utime(path, (t, t))


def test_a_change_loads_once_and_is_counted(tmp_path: Path) -> None:
    paths = files(tmp_path)
    w = FileWatch(paths, check_s=0.0)
    assert w.poll(lambda: pytest.fail("nothing changed"), "old") is None
    touch(paths[1], 2e9)
    assert w.poll(lambda: "new", "old") == "new"
    assert w.poll(lambda: pytest.fail("already served"), "new") is None
    assert w.counts == {"ok": 1, "refused": 0}


def test_a_refused_set_is_not_retried_until_a_file_changes(tmp_path: Path) -> None:
    paths = files(tmp_path)
    w = FileWatch(paths, check_s=0.0)
    touch(paths[0], 2e9)

    def bad() -> str:
        raise ValueError("corrupt checkpoint")

    assert w.poll(bad, "old") is None and w.poll(bad, "old") is None  # tried once
    assert w.counts == {"ok": 0, "refused": 1}
    touch(paths[0], 2e9 + 1)
    assert w.poll(lambda: "fixed", "old") == "fixed"
    assert w.counts == {"ok": 1, "refused": 1}


def test_checks_wait_check_s_unless_requested_and_a_missing_file_is_skipped(tmp_path: Path) -> None:
    paths = files(tmp_path)
    w = FileWatch(paths, check_s=3600.0)
    assert w.poll(lambda: "x", "old") is None  # the first check: nothing changed
    touch(paths[1], 2e9)
    assert w.poll(lambda: "x", "old") is None  # not time yet
    w.request()  # SIGHUP
    assert w.poll(lambda: "new", "old") == "new"
    os.unlink(paths[1])  # a deploy between unlink and rename
    w.request()
    assert w.poll(lambda: pytest.fail("no file to load"), "new") is None
    assert w.counts == {"ok": 1, "refused": 0}
