"""`livemb bench`: the worker against its ceilings, in one run on the embedded broker (SPEC section 9).

1. data: a synthetic log (4,000 users, 50,000 items, 14 days by default) and HierTCN trained one
   epoch on its first `--train-events` events (or --data with --model/--items)
2. the broker; the log preloaded once into `interactions` (4 partitions)
3. ceiling: the passthrough agent (tools/bench/passthrough.py: same Faust config, batching, topics;
   one output per input, no state) drains the preloaded log -> events/s
4. the worker (`livemb worker`, a subprocess) drains the same log under its own group -> events/s
   and the ratio
5. scale-out: two worker processes in one new group drain the same log -> events/s vs one (and
   `--big-items N`: one worker over an N-item catalogue, its index built ahead of time)
6. latency, last (its clicks land in the input topic; every rate above drains the same preloaded
   log): the worker of step 4 again, on its data dir, every user warm; wall-clock-stamped clicks
   offered at fractions of its measured max; per step event-to-publish from the consumer side
   (receive time - event_ts of each message) and from the worker's histogram (bucket bounds);
   `--soak S` adds a long step at `--soak-load`
7. offline components (tools/bench/components.py: retrieval at 50k items (--retrieval-sizes adds 1M), the served model's
   step at batch 1 vs 512 and after 10 vs 10,000 events, state bytes)
8. a JSON report, a Markdown table and a plot (throughput vs offered load, latency CDFs)

Rates are measured from the moment every process of a run answers /readyz (assignment done) to
the moment their `livemb_events_total` counters reach the log's size, sampled every 0.2 s.
Everything started is stopped, by PID, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from livemb.core.errors import ConfigError
from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.retrieval import build_index_file
from livemb.models.train import TrainConfig
from livemb.stream.broker import free_port
from livemb.stream.kafka_io import replay
from livemb.tools.args import BenchArgs
from livemb.tools.bench import load as bench_load
from livemb.tools.bench.components import structured_item_vectors
from livemb.tools.harness import (
    SmallModel,
    cpu_seconds,
    embedded_broker,
    interrupt,
    prepare_model,
    rss_bytes,
    start_worker,
    stop_process,
    wait_ready,
)

log = logging.getLogger("livemb.bench")


def _prepare(args: BenchArgs, settings: Settings, work: Path):
    """The log, checkpoint and items of the run: the given three, or a synthetic log of --users x
    --items-n x --days and HierTCN trained one epoch on its first --train-events events."""
    given = (args.model, args.items, args.data)
    if any(given) and not all(given):
        raise ConfigError("--model, --items and --data go together (or none of them: a synthetic log)")
    spec = SmallModel(users=args.users, items=args.items_n, days=args.days, dim=64, log_name="log.csv",
                      train=TrainConfig(epochs=1), train_events=args.train_events)
    return prepare_model(work, settings, spec, data=args.data, model=args.model, items=args.items)


PASSTHROUGH_OUT = "passthrough.out"  # the passthrough's output topic: each input click, unchanged
FLOOR_IN = "floor.interactions"  # the latency floor's clicks (`_floor`)


def _passthrough(broker_url: str, port: int, work: Path, app_id: str, topic_in: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "livemb.tools.bench.passthrough", "--broker", broker_url, "--web-port", str(port),
           "--app-id", app_id, "--data-dir", str(work / app_id), "--topic-out", PASSTHROUGH_OUT]
    if topic_in is not None:
        cmd += ["--topic-in", topic_in]
    logf = open(work / f"{app_id}.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def worker_flags(settings: Settings) -> tuple[str, ...]:
    """The bench's worker options (--index, --topk, ...) as `livemb worker` flags: without them
    `livemb bench --index hnsw` measured a flat worker. A shadow model (LIVEMB_SHADOW_MODEL_PATH,
    LIVEMB_SHADOW_ITEMS_PATH) is passed on too, so the report names it: its cost is measured."""
    variant = tuple(f for flag, value in (("--exclude-seen", settings.exclude_seen),
                                          ("--repeat-path", settings.repeat_path),
                                          ("--shadow-model", settings.shadow_model_path),
                                          ("--shadow-items", settings.shadow_items_path)) if value for f in (flag, value))
    return ("--index", settings.index, "--topk", str(settings.topk), *variant,
            "--device", settings.device, "--session-gap-s", str(settings.session_gap_s))


def _worker(broker_url: str, model: str, items: str, port: int, work: Path, app_id: str,
            extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`livemb worker` (the production entry point) under its own consumer group; in `extra` a
    later flag overrides an earlier one."""
    return start_worker(broker_url, model, items, work / f"{app_id}-{port}", port, work / f"{app_id}.log", extra,
                        env={"LIVEMB_APP_ID": app_id})


def _big_catalogue(n_items: int, log_items: list[str], work: Path, kind: str) -> tuple[str, str, str, dict]:
    """A catalogue of n_items structured vectors that holds every item of the log, HierTCN over it
    (untrained: the weights do not change the cost of a step), and its index built ahead of time."""
    vecs, _ = structured_item_vectors(n_items, 64, seed=1, n_queries=1)
    extra = [f"bench-{j}" for j in range(max(0, n_items - len(log_items)))]
    table = ItemTable(np.array(log_items + extra, dtype=object)[:n_items], vecs)
    items = str(table.save(work / f"items-{n_items}.npz"))
    ckpt = work / f"hiertcn-{n_items}.pt"
    save_checkpoint(ckpt, build_model("hiertcn", table.padded_vectors()), table.fingerprint)
    index = work / f"items-{n_items}.{kind}.faiss"
    print(f"building the {kind} index of {n_items} items ahead of time ({index})", flush=True)
    t0 = time.perf_counter()
    side = build_index_file(items, kind, index)
    side["build_seconds_measured"] = round(time.perf_counter() - t0, 1)
    return str(ckpt), items, str(index), side


def drain_rate(procs: list[tuple[subprocess.Popen, int]], n: int, label: str, broker_pid: int,
               progress: bench_load.GroupProgress, timeout_s: float = 900) -> dict:
    """Wait until every process is ready, then until the group has committed all n input offsets:
    events/s in between (commits every second), and the CPU cores the processes and the broker
    used meanwhile (CPU-bound or waiting?)."""
    for proc, port in procs:
        wait_ready(port, proc, 180)
    cpu0 = [cpu_seconds(p.pid) for p, _ in procs] + [cpu_seconds(broker_pid)]
    t0, c0 = time.perf_counter(), progress.total()
    last_log, c = t0, c0
    while c < n:
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{label}: {c}/{n} events after {timeout_s:.0f}s")
        for proc, _ in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{label}: a process exited with code {proc.returncode}")
        time.sleep(0.2)
        c = progress.total()
        if time.perf_counter() - last_log > 5:
            last_log = time.perf_counter()
            el = last_log - t0
            print(f"  {label}: {c}/{n} events, {(c - c0) / el:.0f} events/s, {el:.0f}s", flush=True)
    dt = time.perf_counter() - t0
    progress.close()
    rate = (c - c0) / dt
    cpu = [cpu_seconds(p.pid) for p, _ in procs] + [cpu_seconds(broker_pid)]
    used = [round((b - a) / dt, 2) for a, b in zip(cpu0, cpu, strict=True)]
    per_1k = bench_load.cpu_per_1k(sum(b - a for a, b in zip(cpu0[:-1], cpu[:-1], strict=True)), c - c0)
    print(f"{label}: {c - c0} events in {dt:.1f}s = {rate:.0f} events/s; CPU cores used: processes {used[:-1]}, "
          f"broker {used[-1]}; CPU s per 1k events (processes) {per_1k}", flush=True)
    return {"events": c - c0, "seconds": round(dt, 2), "events_per_s": round(rate), "cpu_cores": used[:-1],
            "broker_cpu_cores": used[-1], "cpu_s_per_1k_events": per_1k,
            "broker_cpu_s_per_1k_events": bench_load.cpu_per_1k(cpu[-1] - cpu0[-1], c - c0)}


def _floor(args: BenchArgs, broker, users: list[str], items: list[str], port: int, work: Path, app_id: str,
           mx: float, procs: list[subprocess.Popen]) -> list[dict]:
    """The latency floor: the passthrough under the same live steps (a warm-up, then each offered
    rate) with the same clicks, on an input topic of its own. What the broker, Faust's batches, the
    publish and the reader cost a click with no state and no model; the worker's latency above it is
    the worker's own. Its own topic, because on the embedded broker a fetch's cost grows with the
    small batches a partition holds (docs/STREAMING.md): on the worker's input, after the worker's
    steps, the floor would pay for their clicks; on its own, each step finds what the worker's step
    found, but for the preloaded log (a few large batches)."""
    procs.append(pt := _passthrough(broker.url, port, work, app_id, topic_in=FLOOR_IN))
    wait_ready(port, pt, 180)
    gen = bench_load.LoadGenerator(broker.bootstrap, FLOOR_IN, users, items)
    try:
        gen.run(0.1 * mx, 6.0)  # as before the worker's steps
        time.sleep(1.0)
        rows = [bench_load.latency_step(gen, broker.bootstrap, PASSTHROUGH_OUT, port, f, f * mx, args.step_seconds,
                                        pid=pt.pid, ts_field="ts", label="floor") for f in args.loads]
    finally:
        gen.close()
    stop_process(pt)
    return rows


def run_bench(args: BenchArgs, settings: Settings) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prep = _prepare(args, settings, work)
    df, model, items = prep.log, prep.model, prep.items
    users, item_ids = sorted(map(str, set(df["user_id"]))), sorted(map(str, set(df["item_id"])))
    report: dict = {"machine": bench_load.machine(), "log": {"events": len(df), "users": len(users)},
                    "command": " ".join(sys.argv)}
    tag = str(int(time.time()))
    flags = worker_flags(settings)
    report["worker_flags"] = " ".join(flags)
    procs: list[subprocess.Popen] = []
    try:
        with embedded_broker(settings, extra_topics=(PASSTHROUGH_OUT, FLOOR_IN)) as broker:
            n = replay(df, broker.url, settings.topic_in, progress=True)
            report["broker_pid"] = broker.pid

            port = free_port()
            procs.append(pt := _passthrough(broker.url, port, work, f"bench-pt-{tag}"))
            def group(app_id: str) -> bench_load.GroupProgress:
                return bench_load.GroupProgress(broker.bootstrap, app_id, settings.topic_in, settings.partitions)

            report["passthrough"] = drain_rate([(pt, port)], n, "passthrough", broker.pid, group(f"bench-pt-{tag}"))
            stop_process(pt)

            wport = free_port()
            procs.append(w := _worker(broker.url, model, items, wport, work, f"bench-1w-{tag}", flags))
            report["worker"] = drain_rate([(w, wport)], n, "worker (1 process)", broker.pid,
                                         group(f"bench-1w-{tag}"))
            report["worker"]["rss_mb"] = round(rss_bytes(w.pid) / 2**20)
            report["worker"].update(bench_load.batch_figures(wport))
            report["ratio_worker_passthrough"] = round(
                report["worker"]["events_per_s"] / report["passthrough"]["events_per_s"], 3)
            print(f"worker / passthrough = {report['ratio_worker_passthrough']:.2f}", flush=True)

            mx = args.live_max or report["worker"]["events_per_s"]  # 100 % of the latency steps
            report["live_max_per_s"] = round(mx)
            stop_process(w)

            ports = [free_port(), free_port()]
            pair = [_worker(broker.url, model, items, p, work, f"bench-2w-{tag}", flags) for p in ports]
            procs += pair
            report["two_workers"] = drain_rate(list(zip(pair, ports, strict=True)), n, "worker (2 processes)", broker.pid,
                                              group(f"bench-2w-{tag}"))
            report["scale_out_ratio"] = round(report["two_workers"]["events_per_s"] / report["worker"]["events_per_s"], 3)
            print(f"2 workers / 1 worker = {report['scale_out_ratio']:.2f}", flush=True)
            for p in pair:
                stop_process(p)

            if args.big_items:
                ckpt, big_items, index, side = _big_catalogue(args.big_items, item_ids, work, args.big_index)
                bport = free_port()
                procs.append(b := _worker(broker.url, ckpt, big_items, bport, work, f"bench-big-{tag}",
                                          (*flags, "--index", args.big_index, "--index-path", index)))
                row = drain_rate([(b, bport)], n, f"worker, {args.big_items} items, {args.big_index}",
                                 broker.pid, group(f"bench-big-{tag}"))
                row.update(items=args.big_items, index=args.big_index, index_build=side,
                           rss_mb=round(rss_bytes(b.pid) / 2**20), **bench_load.batch_figures(bport))
                report["big_catalogue"] = row
                stop_process(b)

            # Latency last: its live clicks land in the input topic, and every throughput figure above
            # must drain the same preloaded log (live clicks of random users cost ~3x a backfill event).
            # The 1-worker process comes back on its own data dir and group: every user still warm.
            procs.append(w := _worker(broker.url, model, items, wport, work, f"bench-1w-{tag}", flags))
            wait_ready(wport, w, 180)
            gen = bench_load.LoadGenerator(broker.bootstrap, settings.topic_in, users, item_ids)
            gen.run(0.1 * mx, 6.0)  # warm-up, not measured: the first live event closes every
            time.sleep(settings.idle_sweep_s + 1)  # historic session (the idle sweep), once
            steps = []
            for f in args.loads:
                steps.append(bench_load.latency_step(gen, broker.bootstrap, settings.topic_out, wport, f, f * mx,
                                                     args.step_seconds, pid=w.pid))
            if args.soak:
                soak = bench_load.latency_step(gen, broker.bootstrap, settings.topic_out, wport, args.soak_load,
                                               args.soak_load * mx, args.soak, rss_pid=w.pid, pid=w.pid)
                report["soak"] = soak
            report["latency"] = steps
            gen.close()
            report["log"]["live_clicks"] = gen.sent
            stop_process(w)
            report["floor"] = _floor(args, broker, users, item_ids, port, work, f"bench-floor-{tag}", mx, procs)
    finally:
        for p in procs:
            stop_process(p)
    if not args.skip_offline:
        print("offline components: retrieval, the model step alone, state bytes", flush=True)
        report["offline"] = bench_load.offline_components(args.quick, model, items, args.retrieval_sizes)
    report["seconds"] = round(time.perf_counter() - t_start)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(bench_load.markdown(report))
    bench_load.plot(report, args.plot)
    print(f"wrote {args.json} and {args.plot}; bench took {report['seconds']}s; everything it started is stopped")
    return 0

