"""The docs describe the product as it is: docs/ARCHITECTURE.md's module map names every module
(and no module that is gone), and the product docs carry no journal labels (issue numbers,
work sessions, passes); git keeps the history."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_layers import LAYERS, ROOT

ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
MAP_HEADING = "## Module map"


def module_files(root: Path = ROOT) -> set[str]:
    """Every module the map must name, as repo-relative paths: each *.py of the five packages except
    __init__.py, plus the rooms of tools/ (its sub-folders, as "tools/NAME/")."""
    found = set()
    for pkg in LAYERS:
        for path in (root / pkg).rglob("*.py"):
            if path.name != "__init__.py" and "__pycache__" not in path.parts:
                found.add(path.relative_to(root).as_posix())
    for room in (root / "tools").iterdir():
        if room.is_dir() and room.name != "__pycache__" and not room.name.startswith("."):
            found.add(f"tools/{room.name}/")
    return found


def module_map(text: str) -> list[tuple[str, str, str]]:
    """(package, module, concern) of each row of the "Module map" section's table."""
    section = text.split(MAP_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("package", "---"):
            continue
        rows.append((cells[0], cells[1], "|".join(cells[2:]).strip()))
    return rows


def mapped_paths(rows: list[tuple[str, str, str]]) -> set[str]:
    """Repo-relative paths the map names: each backticked name of a row's module cell, relative to
    the row's package (a name ending in "/" is a room of tools/)."""
    return {f"{pkg}/{name}" for pkg, module, _ in rows for name in re.findall(r"`([^`]+)`", module)}


def map_problems(text: str, root: Path = ROOT) -> list[str]:
    rows = module_map(text)
    named = mapped_paths(rows)
    actual = module_files(root)
    problems = [f"{p}: missing from the module map of docs/ARCHITECTURE.md" for p in sorted(actual - named)]
    problems += [f"{p}: named in the module map but does not exist" for p in sorted(named)
                 if not (root / p).exists()]
    problems += [f"row {pkg} | {module}: no package, module or concern" for pkg, module, concern in rows
                 if pkg not in LAYERS or not re.search(r"`[^`]+`", module) or not concern or "..." in module]
    return problems


def test_module_map_names_every_module_and_only_existing_ones() -> None:
    problems = map_problems(ARCHITECTURE.read_text())
    assert not problems, "\n".join(problems)


def test_module_map_check_catches_a_missing_and_a_stale_row() -> None:
    text = ARCHITECTURE.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| models | `early_stop.py` |"))
    without = text.replace(row + "\n", "")
    assert map_problems(without) == ["models/early_stop.py: missing from the module map of docs/ARCHITECTURE.md"]
    stale = text.replace(row, row + "\n| models | `gone.py` | a module that was removed |")
    assert map_problems(stale) == ["models/gone.py: named in the module map but does not exist"]
    room = next(line for line in text.splitlines() if line.startswith("| tools | `ops/` |"))
    assert map_problems(text.replace(room + "\n", "")) == ["tools/ops/: missing from the module map of docs/ARCHITECTURE.md"]


# The product docs (docs/MODELS.md and the results docs are rewritten elsewhere and not checked here).
PRODUCT_DOCS = ["README.md", "docs/ARCHITECTURE.md", "docs/STREAMING.md", "docs/CONTRACTS.md", "docs/BENCHMARKS.md",
                "deploy/models/README.md"]
JOURNAL = re.compile(
    r"\bissue\s+\d+|\bissue's\b|\bthe issue\b|\bsession\s+1\d\b|\bsessions?\s+\d+\s*(?:,|and)\s*\d+"
    r"|\b(?:first|second|third|fourth|fifth|sixth)\s+pass\b|\bthis task\b|\bthis session's\b|\bthe lead\b|\bwas lent\b|\bsession note\b"
    r"|\bruns/s\d+/",
    re.IGNORECASE,
)


def test_product_docs_carry_no_journal_labels() -> None:
    found = [f"{doc}:{n}: {m.group(0)!r}" for doc in PRODUCT_DOCS
             for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1) for m in JOURNAL.finditer(line)]
    assert found == []
