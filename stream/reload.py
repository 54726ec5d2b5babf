"""Hot swap triggers for the worker: a SIGHUP handler and the between-batch check on a timer.

The swap itself is `ModelProcessor.maybe_reload` (stream/processor.py): it re-reads the checkpoint
and the items file when their mtimes change and swaps the whole `Serving` in one assignment. Here:

- `install_sighup`: SIGHUP makes the next check happen at once (otherwise every `reload_check_s`);
- `reload_tick`: called by the worker's 0.25 s timer, so a swap happens (and `livemb_model_info`
  follows) even while no events arrive. The timer runs on the event loop between batches, never
  inside one, so a batch sees either the old or the new model.
"""

from __future__ import annotations

import logging
import signal

from stream.metrics import Metrics
from stream.ports import BatchProcessor

log = logging.getLogger("livemb.worker")


def install_sighup(processor: BatchProcessor) -> None:
    """SIGHUP -> processor.request_reload(). Without a handler SIGHUP would terminate the worker
    (the default action)."""

    def on_hup(_sig: int, _frame: object) -> None:
        log.info("SIGHUP: checking the checkpoint and items files now")
        processor.request_reload()

    signal.signal(signal.SIGHUP, on_hup)


def reload_tick(processor: BatchProcessor, metrics: Metrics) -> None:
    processor.maybe_reload()
    for result, n in processor.reload_counts.items():
        seen = metrics.registry.get_sample_value("livemb_model_reloads_total", {"result": result}) or 0.0
        if n > seen:  # counters only go up: add what happened since the last tick
            metrics.model_reloads.labels(result).inc(n - seen)
