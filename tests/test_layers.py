"""The layers point one way: core <- models <- state <- stream <- tools (tests may import anything).

Every import statement is read from the source (including imports inside functions and under
TYPE_CHECKING), so a lazy upward import cannot hide from this check."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "models", "state", "stream", "tools"]  # each may import only itself and those before it


def layer_of(module: str) -> str:
    """The project package a module name is in ("livemb.stream.batch" -> "stream"), else its top name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "livemb" and len(parts) > 1 else parts[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, layer_of(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, layer_of(node.module)))
    return [(line, top) for line, top in out if top in LAYERS]


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for rank, pkg in enumerate(LAYERS):
        for path in sorted((root / pkg).rglob("*.py")):
            for line, top in imports_of(path):
                if LAYERS.index(top) > rank:
                    bad.append(f"{path.relative_to(root)}:{line} imports {top} (a layer above {pkg})")
    return bad


def test_no_upward_import_between_packages() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    fake = tmp_path / "state"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from livemb.stream.batch import BatchStep\n")
    for pkg in LAYERS:
        if pkg != "state":
            (tmp_path / pkg).mkdir()
    assert upward_imports(tmp_path) == ["state/x.py:2 imports stream (a layer above state)"]


def function_level_imports(pkg: str, root: Path = ROOT) -> list[str]:
    """Project imports inside a function body: the sign of an import circle worked around."""
    bad = []
    for path in sorted((root / pkg).rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                bad += [f"{path.relative_to(root)}:{node.lineno} imports {m} inside {fn.name}"
                        for m in mods if layer_of(m) in LAYERS]
    return bad


def test_models_import_the_project_at_module_level_only() -> None:
    assert function_level_imports("models") == []


def test_the_check_sees_a_function_level_import(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.py").write_text("import math\n\ndef f():\n    import numpy\n    from livemb.models.train import g\n")
    assert function_level_imports("models", tmp_path) == ["models/x.py:5 imports livemb.models.train inside f"]


def test_every_package_directory_is_a_regular_package() -> None:
    """setuptools' find_packages (pyproject) skips a directory without __init__.py, so a wheel (the
    Docker image) would miss its modules while the editable install still finds them."""
    missing = [str(d.relative_to(ROOT)) for pkg in LAYERS for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")]
               if d.is_dir() and "__pycache__" not in d.parts and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert missing == []
