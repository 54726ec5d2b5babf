"""A BatchProcessor without a model, for worker tests: state = per-user event count and last ts;
output = the count as JSON. Loaded by `livemb worker --processor tests.counting:make_processor`."""

from __future__ import annotations

import time

import numpy as np
import orjson

from livemb.core.events import ValidEvent
from livemb.state.record import StateRecordError, decode, encode
from livemb.stream.ports import ModelInfo, StepResult


class CountingProcessor:
    """No model, so nothing to hot-swap and no sessions to close."""

    ready = True
    reload_counts: dict[str, int] = {}

    def model_info(self) -> ModelInfo | None:
        return None

    def request_reload(self) -> None:
        pass

    def maybe_reload(self) -> bool:
        return False

    def idle_messages(self, states: dict[str, bytes], last_ts: dict[str, int]) -> list[tuple[str, bytes]]:
        return []

    def process(self, events: list[ValidEvent], states: dict[str, bytes | None]) -> StepResult:
        counts: dict[str, int] = {}
        rejected: dict[str, str] = {}
        for u, blob in states.items():
            try:
                counts[u] = 0 if blob is None else int(decode(blob)[1]["count"])
            except (StateRecordError, KeyError) as e:  # like the model processor: refuse this user only
                rejected[u] = f"not a counting state: {e}"
        last: dict[str, ValidEvent] = {}
        for ev in (e for e in events if e.user_id not in rejected):
            counts[ev.user_id] = counts.get(ev.user_id, 0) + 1
            last[ev.user_id] = ev
        new = {u: encode({"hist": np.zeros(1, np.int64)}, {"count": counts[u], "last_ts": e.ts}) for u, e in last.items()}
        now = int(time.time() * 1000)
        outs = [(u, orjson.dumps({"user_id": u, "count": counts[u], "event_ts": e.ts, "emitted_at": now}))
                for u, e in last.items()]
        return StepResult(states=new, outputs=outs, rejected=rejected)


def make_processor(_settings: object) -> CountingProcessor:
    return CountingProcessor()


class UnpublishableProcessor(CountingProcessor):
    """The counting processor, except that the output of user "poison" is not bytes: the batch's
    publish (step 6) raises outside the processor, as a broker refusing a batch for good would."""

    def process(self, events: list[ValidEvent], states: dict[str, bytes | None]) -> StepResult:
        result = super().process(events, states)
        result.outputs = [(u, 12345 if u == "poison" else v) for u, v in result.outputs]  # type: ignore[misc]
        return result


def make_unpublishable(_settings: object) -> UnpublishableProcessor:
    return UnpublishableProcessor()
