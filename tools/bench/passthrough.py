"""The benchmark's ceiling: a trivial Faust agent on the same broker, topics and batching as the worker.

One output per input (the input value, unchanged), no state, no model: what is left of a batch
is Faust's per-message path, the broker and the producer. `livemb bench` runs it beside the real
worker on the same preloaded log so the worker/passthrough ratio is measured in one run.

    python -m livemb.tools.bench.passthrough --broker kafka://127.0.0.1:PORT --web-port P --app-id bench-pt \
        --topic-in interactions --topic-out passthrough.out

Same Faust config as the worker (stream.app.faust_config), the same adaptive batches, the same
publish (send all, then wait for every ack); it serves `livemb_events_total{outcome="ok"}` on
/metrics and /readyz like the worker, so the harness measures both the same way.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import faust

from livemb.core.settings import load_settings
from livemb.stream import faust_compat
from livemb.stream.app import TopicSink, adaptive_fetch_wait, faust_config
from livemb.stream.batching import adaptive_batches
from livemb.stream.heap import freeze_startup_objects
from livemb.stream.metrics import Metrics, serve
from livemb.stream.ports import OutputRecord


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--web-port", type=int, required=True)
    p.add_argument("--app-id", default="bench-passthrough")
    p.add_argument("--topic-in", default="interactions")
    p.add_argument("--topic-out", default="passthrough.out")
    p.add_argument("--data-dir", default="runs/bench/passthrough")
    a = p.parse_args(argv)
    s = load_settings(broker=a.broker, app_id=a.app_id, data_dir=a.data_dir, web_port=a.web_port,
                      broker_kind="embedded")  # `livemb bench` runs it on the embedded broker, like its worker
    Path(s.data_dir).mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    server = serve(metrics, s.web_port, s.web_host)
    adaptive_fetch_wait(s, metrics)  # as the worker's consumer
    app = faust.App(s.app_id, **faust_config(s))
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    t_in = app.topic(a.topic_in, partitions=s.partitions, **raw)
    sink = TopicSink(app)  # the worker's publish path

    @app.agent(t_in)
    async def passthrough(stream: Any) -> None:
        faust_compat.widen_producer_buffer(app, 2 * s.batch_max_events)
        freeze_startup_objects()  # as the worker does: the ceiling runs the same runtime
        async for batch in adaptive_batches(stream, s.batch_max_events, s.batch_max_wait_ms / 1000):
            await sink.publish([OutputRecord(a.topic_out, ev.message.key, ev.message.value) for ev in batch])
            metrics.count(Counter(ok=len(batch)))
            metrics.batch_size.observe(len(batch))

    @app.timer(0.25)
    async def readiness() -> None:
        metrics.readiness.set("tables_recovered", not app.rebalancing)
        metrics.readiness.set("model_loaded", True)

    try:
        faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
