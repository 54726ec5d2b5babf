"""Where a live batch's time goes, in process (no broker): `ModelProcessor.process` or the whole batch step.

    python -m livemb.tools.bench.livebatch                      # 4,000 warm users, 50,000 items, HierTCN
    python -m livemb.tools.bench.livebatch --profile 10         # plus cProfile of batches of 10 users
    python -m livemb.tools.bench.livebatch --step               # the worker's whole batch step instead
    python -m livemb.tools.bench.livebatch --sizes 120 --events-per-user 3.7   # backfill-like batches

Random users, one click each (what `livemb bench`'s live steps send), batches of 1-30 users over
warm states (each user stepped through a few events first). The processor's own objects are
wrapped with timers (nothing in stream/ is changed), so the steps are the worker's: decode (state
rows -> arrays), stack (arrays -> tensors), quality (the online quality counts, stream/quality.py,
timed by the processor), model step, candidates (faiss / flat search + the
repeat path), messages (the output JSON), encode (tensors -> rows), and the rest of `process`
(grouping). Figures are ms per batch and per user (median of the
repeats); `--profile B` prints the top functions by own time for batches of B users.
`--events-per-user MEAN` gives each user of a batch a geometric number of clicks with that mean
(at most 16), interleaved in time, instead of one: what a backfill batch holds (the bench's
synthetic log, read from the start: ~440 events of ~115 users per batch, 3.7 per user, up to ~13).

`--step` times the worker's whole batch step (stream/batch.py, steps 1-7 and the metrics) instead:
input records (the bench's click JSON) -> validate -> state rows read from RocksDB (rocksdict
with Faust's options, one db per partition, as the worker's table store; no changelog producer)
-> guard -> the same processor -> an in-memory sink (no broker round trip) -> rows written ->
Prometheus metrics. Figures: ms per batch per step (wall clock), `process` the processor call
inside step 5, `step5_rest` the rest of step 5, `observe` the metrics after step 7, `loop` the
event loop running the step's task, `cpu` the thread's CPU time of the whole step (below `total`
on a busy machine). `--idle-ms T` sleeps T ms before each batch, as the worker waits for acks and
the next fetch between batches: the caches cool down.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import torch
from faust.stores.rocksdb import RocksDBOptions

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.stream.batch import TIMED_STEPS, BatchStep, Step
from livemb.stream.metrics import Metrics
from livemb.stream.ports import InputRecord, OutputRecord
from livemb.stream.processor import ModelProcessor
from livemb.stream.validate import ValidEvent
from livemb.tools.bench.components import structured_item_vectors

STEPS = ("decode", "stack", "quality", "model_step", "candidates", "messages", "encode")
T0 = 1_700_000_000_000
MAX_EVENTS_PER_USER = 16


def _timed(fn: Callable, name: str, acc: dict[str, float]) -> Callable:
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[name] += time.perf_counter() - t
    return wrapper


class LiveBatches:
    """A ModelProcessor over `users` warm users; `batch(B)` runs one live batch of B random users."""

    def __init__(self, work: Path, users: int = 4000, items: int = 50_000, model: str = "hiertcn",
                 warm_events: int = 3, seed: int = 0, checkpoint: str | None = None, items_path: str | None = None,
                 events_per_user: float = 1.0):
        if checkpoint is None or items_path is None:
            vecs, _ = structured_item_vectors(items, 64, seed=seed, n_queries=1)
            table = ItemTable(np.array([f"i{j}" for j in range(items)], dtype=object), vecs)
            items_path = str(table.save(work / "items.npz"))
            checkpoint = str(work / "model.pt")
            torch.manual_seed(seed)
            save_checkpoint(checkpoint, build_model(model, table.padded_vectors()), table.fingerprint)
        self.proc = ModelProcessor(Settings(model_path=checkpoint, items_path=items_path))
        self.item_ids = list(self.proc.serving.table.ids)
        self.users = [f"u{j}" for j in range(users)]
        self.rng, self.seq, self.now = random.Random(seed), 0, T0
        self.events_per_user, self.counts_rng = events_per_user, np.random.default_rng(seed)
        self.blobs: dict[str, bytes] = {}
        for _ in range(warm_events):  # every user warm: a few events in one open session
            for i in range(0, users, 500):
                self._run([self._event(u) for u in self.users[i:i + 500]])
        self.acc: dict[str, float] = defaultdict(float)
        self._wrap()

    def _event(self, user: str) -> ValidEvent:
        self.seq += 1
        self.now += 7
        return ValidEvent(user, self.rng.choice(self.item_ids), self.now, "click", f"e{self.seq}", 0, self.seq)

    def clicks(self, users: list[str]) -> list[str]:
        """The batch's clicks as their users, in time order: one each, or with `events_per_user` > 1 a
        geometric count per user (mean events_per_user, at most MAX_EVENTS_PER_USER), round-robin."""
        if self.events_per_user <= 1:
            return users
        counts = np.minimum(self.counts_rng.geometric(1 / self.events_per_user, len(users)), MAX_EVENTS_PER_USER)
        return [u for t in range(int(counts.max())) for u, n in zip(users, counts, strict=True) if n > t]

    def _run(self, events: list[ValidEvent]):
        res = self.proc.process(events, {e.user_id: self.blobs.get(e.user_id) for e in events})
        self.blobs.update(res.states)
        return res

    def _wrap(self) -> None:
        """Timers around the processor's own objects (instance attributes: the classes are untouched)."""
        p, acc = self.proc, self.acc
        p.codec.decode = _timed(p.codec.decode, "decode", acc)
        p.codec.stack = _timed(p.codec.stack, "stack", acc)
        p.codec.encode = _timed(p.codec.encode, "encode", acc)
        sv = p.serving
        sv.advance = _timed(sv.advance, "model_step", acc)
        sv.retriever.candidates = _timed(sv.retriever.candidates, "candidates", acc)
        recommend = sv.recommend

        def eager(*a, **kw):  # the messages are a generator the processor drains: drain it here, timed
            items, gen = recommend(*a, **kw)
            t = time.perf_counter()
            out = list(gen)
            acc["messages"] += time.perf_counter() - t
            return items, iter(out)
        sv.recommend = eager

    def batch(self, B: int) -> dict[str, float]:
        """One batch of B distinct random users (`clicks`): seconds per step."""
        self.acc.clear()
        events = [self._event(u) for u in self.clicks(self.rng.sample(self.users, B))]
        t = time.perf_counter()
        res = self._run(events)
        total = time.perf_counter() - t
        self.acc["quality"] = res.quality_seconds  # the processor times its online quality counts itself
        out = {k: self.acc.get(k, 0.0) for k in STEPS}
        out["other"] = total - sum(out.values())
        out["total"] = total
        return out


class RocksStore:
    """StateStore over one rocksdict db per partition, opened with Faust's RocksDB options (what the
    worker's table store reads and writes, without Faust's table wrapper and changelog)."""

    def __init__(self, path: Path, partitions: int) -> None:
        shutil.rmtree(path, ignore_errors=True)  # a fresh store: the offsets start at 0
        opts = RocksDBOptions(use_rocksdict=True)
        self.dbs = [opts.open(path / f"p{p}") for p in range(partitions)]

    def get(self, user_id: str, at: InputRecord) -> bytes | None:
        return self.dbs[at.partition].get(user_id.encode())

    def put(self, user_id: str, row: bytes, at: InputRecord) -> None:
        self.dbs[at.partition].put(user_id.encode(), row)


class ListSink:
    def __init__(self) -> None:
        self.records: list[OutputRecord] = []

    async def publish(self, records) -> None:
        self.records.extend(records)


class TimedStep(BatchStep):
    """The batch step with its own step marks kept (the metrics' marks, `livemb_batch_step_seconds`)."""

    async def run(self, records: list[InputRecord]):
        report = await super().run(records)
        self.end = time.perf_counter()
        return report

    def finished(self, step: Step, marks: list[float]) -> None:
        super().finished(step, marks)
        self.marks = marks


STEP_PARTS = ("gaps", "validate", "read", "guard", "process", "step5_rest", "publish", "write", "observe", "loop", "cpu")


class LiveSteps:
    """The worker's batch step over the processor of `lb` and a RocksDB store of its warm users."""

    def __init__(self, lb: LiveBatches, work: Path, partitions: int = 4, idle_ms: float = 0.0) -> None:
        self.lb, self.partitions, self.idle_s = lb, partitions, idle_ms / 1000
        self.store = RocksStore(work / "rocks", partitions)
        self.sink = ListSink()
        self.offsets = [0] * partitions
        self.loop = asyncio.new_event_loop()
        self.step = TimedStep(lb.proc.settings, lb.proc, self.store, self.sink, Metrics())
        self.acc: dict[str, float] = defaultdict(float)
        users = lb.users
        for i in range(0, len(users), 500):  # warm: the users' rows through the step itself
            for _ in range(3):
                self._run(users[i:i + 500])
        p = lb.proc
        p.process = _timed(p.process, "process", self.acc)

    def _records(self, users: list[str]) -> list[InputRecord]:
        out = []
        for u in users:
            part = int(u[1:]) % self.partitions
            self.lb.seq += 1
            doc = {"user_id": u, "item_id": self.lb.rng.choice(self.lb.item_ids), "ts": int(time.time() * 1000),
                   "event_id": f"bench-{self.lb.seq}"}
            out.append(InputRecord("interactions", part, self.offsets[part], u.encode(), orjson.dumps(doc)))
            self.offsets[part] += 1
        return out

    def _run(self, users: list[str]) -> tuple[float, float]:
        """One batch step over one click per entry of `users`: its wall-clock and CPU seconds."""
        self.sink.records.clear()
        records = self._records(users)
        t, c = time.perf_counter(), time.thread_time()
        self.loop.run_until_complete(self.step.run(records))
        return time.perf_counter() - t, time.thread_time() - c

    def batch(self, B: int) -> dict[str, float]:
        self.acc.clear()
        users = self.lb.clicks(self.lb.rng.sample(self.lb.users, B))
        if self.idle_s:  # the worker waits between batches (acks, the next fetch): caches cool down
            time.sleep(self.idle_s)
        total, cpu = self._run(users)
        m = self.step.marks
        out = {s.value: b - a for s, (a, b) in zip(TIMED_STEPS, zip(m, m[1:], strict=False), strict=True)}
        out["step5_rest"] = out.pop("process") - self.acc["process"]
        out["process"] = self.acc["process"]
        out["observe"] = self.step.end - m[-1]  # the batch's metrics and counts, after step 7
        out["loop"] = total - (self.step.end - m[0])  # the event loop running the step's task
        out["cpu"], out["total"] = cpu, total
        out = {k: out[k] for k in (*STEP_PARTS, "total")}
        return out


def measure(lb: LiveBatches | LiveSteps, sizes: list[int], reps: int = 60) -> list[dict]:
    """Median ms per step per batch and per user, for each batch size."""
    rows = []
    for B in sizes:
        for _ in range(5):
            lb.batch(B)
        runs = [lb.batch(B) for _ in range(reps)]
        med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        rows.append({"batch": B, "ms": {k: round(1e3 * v, 3) for k, v in med.items()},
                     "ms_per_user": {k: round(1e3 * v / B, 3) for k, v in med.items()}})
    return rows


def profile(lb: LiveBatches | LiveSteps, B: int, reps: int = 100, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        lb.batch(B)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def table(rows: list[dict], parts: tuple[str, ...] = (*STEPS, "other")) -> str:
    head = ["batch", *parts, "total"]
    lines = ["| users | " + " | ".join(head[1:]) + " | total per user |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r['ms'][k]:.2f}" for k in head[1:])
                     + f" | {r['ms_per_user']['total']:.3f} |")
    return "\n".join(lines) + "\n(ms per batch, median)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--model", default="hiertcn")
    ap.add_argument("--sizes", default="1,3,10,30")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--profile", type=int, default=0, help="cProfile batches of this many users")
    ap.add_argument("--step", action="store_true", help="time the worker's whole batch step (RocksDB rows, "
                    "metrics; no broker) instead of the processor's parts")
    ap.add_argument("--idle-ms", type=float, default=0.0, help="with --step: sleep this long before each batch "
                    "(the worker's wait between batches; 0: back to back)")
    ap.add_argument("--events-per-user", type=float, default=1.0, help="mean clicks per user in a batch "
                    "(geometric, at most 16; 1: one click each, a live batch; ~3.7: a backfill batch)")
    ap.add_argument("--workdir", default="runs/livebatch")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lb: LiveBatches | LiveSteps = LiveBatches(work, a.users, a.items, a.model,
                                                  events_per_user=a.events_per_user)
    if a.step:
        lb = LiveSteps(lb, work, idle_ms=a.idle_ms)
    rows = measure(lb, [int(x) for x in a.sizes.split(",")], a.reps)
    print(table(rows, STEP_PARTS if a.step else (*STEPS, "other")))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.profile:
        print(profile(lb, a.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
