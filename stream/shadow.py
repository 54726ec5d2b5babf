"""The shadow model: a challenger stepped on the same batches as the served model, publishing nothing.

`livemb worker --shadow-model CKPT [--shadow-items ITEMS]` (settings `shadow_model_path`,
`shadow_items_path`, `shadow_publish`). In step 6 of every batch (stream/batch.py), once the
served model's messages are acked (so they never wait for the shadow), the shadow's own
`ModelProcessor` takes the same applied events (those of users the served model accepted) and
its own stored states, and returns its new states, its online quality counts (stream/quality.py;
the metrics carry model="shadow") and its messages. The messages go nowhere unless
`shadow_publish` is on (then to `<topic_out>.shadow`, sent and acked before step 7).

State: the shadow's blob is a field of the same table row as the served model's (the guard
envelope's `shadow` array, state/guard.py), written by the same put in step 7. So the commit order,
the offset guard, the changelog, recovery, rebalance and a crash treat both states as one value:
the shadow's state is exactly as exact as the served model's, with no argument of its own.

Rules, each keeping "a stored shadow blob has seen every event applied to its row since it was
created":
  - a user without a shadow blob (new, or written while no shadow ran) starts the shadow from
    the model's initial state (the served model's state is not copied: another model's);
  - a shadow blob the shadow refuses (another model's state, after `--shadow-model` changed to
    another architecture) is started over the same way, with a warning;
  - a shadow failure (an exception in its step) never touches the served model's batch: the
    batch's users lose their shadow blob (written without one) and start over at their next event;
  - a worker without a shadow writes every row it touches without the shadow blob.
Promotion is the served model's hot swap (copy the challenger's files over --model/--items); the
shadow's rows are not carried over to the served model (docs/STREAMING.md "Shadow model").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from livemb.core.errors import ConfigError
from livemb.core.events import ValidEvent
from livemb.core.settings import Settings
from livemb.stream.contracts import OUTPUT_HEADERS
from livemb.stream.ports import BatchProcessor, ModelInfo, OutputRecord, StepResult
from livemb.stream.processor import ModelProcessor
from livemb.stream.quality import OnlineQuality

log = logging.getLogger("livemb.shadow")


@dataclass
class ShadowResult:
    """The shadow's part of one batch."""

    states: dict[str, bytes | None] = field(default_factory=dict)  # user -> new shadow blob (None: drop it)
    outputs: list[OutputRecord] = field(default_factory=list)  # only with shadow_publish
    quality: OnlineQuality | None = None
    seconds: float = 0.0  # the shadow's whole step (decode, model, top-K, encode)
    restarted: int = 0  # users whose refused shadow blob was started over
    failed: bool = False


class Shadow:
    def __init__(self, processor: BatchProcessor, topic: str | None = None) -> None:
        """processor: the challenger's; topic: where its messages go (None: nowhere)."""
        self.processor, self.topic = processor, topic

    @classmethod
    def from_settings(cls, settings: Settings) -> Shadow | None:
        """The shadow of `shadow_model_path` (None without one): every setting as the served
        model's except the checkpoint and items (and no prebuilt index, which is the served items')."""
        if not settings.shadow_model_path:
            return None
        if not (settings.shadow_items_path or settings.items_path):
            raise ConfigError("--shadow-model needs --shadow-items ITEMS (or the served model's --items)")
        s = settings.model_copy(update={"model_path": settings.shadow_model_path,
                                        "items_path": settings.shadow_items_path or settings.items_path,
                                        "index_path": None})
        proc = ModelProcessor(s)
        log.info("shadow model %s (items %s), %s", s.model_path, s.items_path,
                 f"its messages go to {settings.topic_shadow}" if settings.shadow_publish else "publishing nothing")
        return cls(proc, settings.topic_shadow if settings.shadow_publish else None)

    def model_info(self) -> ModelInfo | None:
        return self.processor.model_info()

    def step(self, events: Sequence[ValidEvent], stored: dict[str, bytes | None]) -> ShadowResult:
        """Advance the shadow over `events` (the batch's applied events the served model accepted,
        arrival order) from `stored` (each of their users' shadow blob, None: none yet)."""
        t0 = time.perf_counter()
        out = ShadowResult()
        if not events:
            return out
        try:
            res = self.processor.process(list(events), {e.user_id: stored.get(e.user_id) for e in events})
            if res.rejected:  # another model's blob: start those users over
                log.warning("shadow: %d stored shadow state(s) refused, started over (e.g. %s)",
                            len(res.rejected), next(iter(res.rejected.values())))
                again = [e for e in events if e.user_id in res.rejected]
                fresh = self.processor.process(again, dict.fromkeys(res.rejected))
                res = merge(res, fresh)
                out.restarted = len(res.rejected)
        except Exception:  # noqa: BLE001 - a challenger bug must not touch the served model's batch
            log.exception("shadow model failed on a batch of %d events; its users' shadow state starts over",
                          len(events))
            out.states = {e.user_id: None for e in events}
            out.failed = True
            out.seconds = time.perf_counter() - t0
            return out
        out.states = dict(res.states)
        out.quality = res.quality
        if self.topic is not None:
            out.outputs = [OutputRecord(self.topic, u.encode(), v, OUTPUT_HEADERS) for u, v in res.outputs]
        out.seconds = time.perf_counter() - t0
        return out


def merge(first: StepResult, again: StepResult) -> StepResult:
    """`first` with the users it refused replaced by `again`'s results for them."""
    q = first.quality
    if q is not None and again.quality is not None:
        q = OnlineQuality(q.targets + again.quality.targets, q.hits + again.quality.hits,
                          q.rr_sum + again.quality.rr_sum)
    return StepResult(states={**first.states, **again.states}, outputs=[*first.outputs, *again.outputs],
                      rejected=first.rejected, quality=q)
