"""Experiment scripts (`python -m livemb.tools.experiments.<name>`), set up as the CLI sets up a command."""

from livemb.core.allocator import hold_freed_memory
from livemb.core.settings import load_settings


def process_setup() -> None:
    """What `livemb` does before a command runs (tools/cli.main), so an experiment's figures are the
    CLI's: the allocator's thresholds from the settings (LIVEMB_MALLOC_HOLD_MB)."""
    hold_freed_memory(load_settings().malloc_hold_mb)
