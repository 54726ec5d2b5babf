"""tools/ stays a house with rooms: project imports at module level (the exceptions listed with
their reason), no private name imported from another module, files a reader can hold, and a CLI
whose every subcommand goes through the dispatch table with typed arguments that read every flag."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from livemb.tools.args import BenchArgs, SoakArgs, WorkerArgs, flag_fields, from_namespace
from livemb.tools.cli import COMMANDS, build_parser, settings_for
from tests.test_layers import ROOT, function_level_imports

# "path imports module inside function": why it is not at module level.
# (The command handlers are not here: tools/cli.py names them "module:function" and imports them
# at dispatch, tests/test_cli_startup.py.)
LAZY_IMPORTS = {
    "tools/cli.py imports livemb.core.settings inside settings_for":
        "pydantic, a third of the start-up of `livemb --help` and `--version`, which build no settings",
}
# Private names imported across modules that tools/ cannot fix on its own.
PRIVATE_IMPORTS = {
    "tools/experiments/epoch_curve.py imports livemb.models.train._run_epochs":
        "models/ has no public per-epoch callback yet (models/ is another room's)",
}
MAX_LINES = 500


def test_project_imports_in_tools_are_at_module_level() -> None:
    found = {re.sub(r":\d+ ", " ", line) for line in function_level_imports("tools")}
    assert found == set(LAZY_IMPORTS)


def private_imports(pkg: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                bad += [f"{path.relative_to(root)} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_private_name_is_imported_across_modules() -> None:
    assert set(private_imports("tools")) == set(PRIVATE_IMPORTS)


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.py").write_text("from livemb.tools.ops.demo import _prepare, run_demo\n")
    assert private_imports("tools", tmp_path) == ["tools/x.py imports livemb.tools.ops.demo._prepare"]


def test_tools_files_stay_small() -> None:
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "tools").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# One valid command line per subcommand (required flags only).
SAMPLES = {
    "synth": ["--out", "log.csv"], "item-embeddings": ["--data", "log.csv", "--out", "items.npz"],
    "train": ["--data", "log.csv", "--out", "m.pt"], "evaluate": ["--data", "log.csv"],
    "embed": ["--data", "log.csv", "--model", "m.pt", "--items", "items.npz", "--out", "u.jsonl"],
    "broker": [], "worker": [], "index": ["--items", "items.npz", "--out", "i.faiss"], "replay": ["log.csv"],
    "tail": [], "rebuild-state": [], "config": [], "dashboard": ["--prometheus", "http://p", "--out", "d.png"],
    "demo": [], "soak": [], "bench": [], "schemas": [], "dlq": ["tail"],
}


def test_every_subcommand_is_in_the_table() -> None:
    usage = build_parser().format_usage()
    choices = set(re.search(r"\{([a-z,-]+)\}", usage).group(1).split(","))
    assert choices == set(COMMANDS) == set(SAMPLES)


@pytest.mark.parametrize("cmd", sorted(SAMPLES))
def test_typed_arguments_read_every_flag(cmd: str) -> None:
    ns = build_parser().parse_args([cmd, *SAMPLES[cmd]])
    flags = set(vars(ns)) - {"cmd", "verbose"}
    assert flag_fields(COMMANDS[cmd].args) == flags  # no flag dropped, no field without a flag
    args = from_namespace(COMMANDS[cmd].args, ns)
    settings_for(args)  # the defaults make valid settings


def test_settings_come_from_the_typed_arguments() -> None:
    ns = build_parser().parse_args(["worker", "--model", "m.pt", "--items", "i.npz", "--data-dir", "d",
                                    "--partitions", "2", "--broker", "kafka://h:1", "--topk", "7"])
    s = settings_for(from_namespace(WorkerArgs, ns))
    assert (s.model_path, s.items_path, s.data_dir, s.partitions, s.broker, s.topk) == \
        ("m.pt", "i.npz", "d", 2, "kafka://h:1", 7)
    bench = from_namespace(BenchArgs, build_parser().parse_args(["bench", "--model", "m.pt"]))
    assert settings_for(bench).model_path != "m.pt"  # only the worker's --model is the served model


def test_soak_has_its_own_arguments() -> None:
    soak = from_namespace(SoakArgs, build_parser().parse_args(["soak", "--seconds", "5"]))
    assert soak.seconds == 5 and not hasattr(soak, "data")  # soak always replays a synthetic log
    with pytest.raises(AttributeError):
        soak.workdir = "elsewhere"  # frozen: no command rewrites another's arguments


# The rooms of tools/, bottom up: a room imports only itself and rooms of a lower rank.
ROOM_RANK = {"args": 0, "data": 1, "offline": 2, "harness": 3, "bench": 4, "ops": 4, "experiments": 4, "cli": 5}


def room_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "tools").rglob("*.py")):
        rel = path.relative_to(root / "tools")
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if room == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for m in mods:
                parts = m.split(".")[1:] if m.startswith("livemb.") else m.split(".")
                if parts[0] == "tools" and len(parts) > 1 and parts[1] != room \
                        and ROOM_RANK[parts[1]] >= ROOM_RANK[room]:
                    bad.append(f"tools/{rel} imports {m}")
    return bad


def test_rooms_import_downwards_only() -> None:
    assert room_imports() == []
