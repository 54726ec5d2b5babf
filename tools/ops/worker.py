"""`livemb worker`: the production worker (stream/app.py) with the model's processor or another one.

Its own module so that faust (imported by stream.app) is loaded by `livemb worker` only: tools/cli.py
resolves the handler by name when the command runs.
"""

from __future__ import annotations

import importlib

from livemb.core.errors import ConfigError
from livemb.core.settings import Settings
from livemb.stream.app import run_worker as run_faust_worker
from livemb.stream.processor import ModelProcessor
from livemb.stream.shadow import Shadow
from livemb.tools.args import WorkerArgs


def load_processor(spec: str | None, settings: Settings):
    """The model processor, or 'module:factory' where factory(settings) -> BatchProcessor."""
    if spec is None:
        return ModelProcessor(settings)
    mod, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"--processor must be module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--processor {spec}: {e}") from None
    return factory(settings)


def run_worker(a: WorkerArgs, settings: Settings) -> int:
    processor = load_processor(a.processor, settings)
    run_faust_worker(settings, processor, a.loglevel, shadow=Shadow.from_settings(settings))
    return 0
