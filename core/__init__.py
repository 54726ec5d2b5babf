"""The base layer: settings, errors, events, the item table (docs/ARCHITECTURE.md)."""

# The project's version, read by pyproject.toml (setuptools dynamic version) and shown by
# `livemb --version` when no installed distribution metadata is found.
__version__ = "0.1.0"
