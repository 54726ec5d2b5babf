"""Where a live batch's time goes, in process (no broker): `ModelProcessor.process` step by step.

    python -m livemb.tools.bench.livebatch                      # 4,000 warm users, 50,000 items, HierTCN
    python -m livemb.tools.bench.livebatch --profile 10         # plus cProfile of batches of 10 users

Random users, one click each (what `livemb bench`'s live steps send), batches of 1-30 users over
warm states (each user stepped through a few events first). The processor's own objects are
wrapped with timers (nothing in stream/ is changed), so the steps are the worker's: decode (state
rows -> arrays), stack (arrays -> tensors), quality (the online quality counts, stream/quality.py,
timed by the processor), model step, candidates (faiss / flat search + the
repeat path), messages (the output JSON), encode (tensors -> rows), and the rest of `process`
(grouping). Figures are ms per batch and per user (median of the
repeats); `--profile B` prints the top functions by own time for batches of B users.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.stream.processor import ModelProcessor
from livemb.stream.validate import ValidEvent
from livemb.tools.bench.components import structured_item_vectors

STEPS = ("decode", "stack", "quality", "model_step", "candidates", "messages", "encode")
T0 = 1_700_000_000_000


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
                 warm_events: int = 3, seed: int = 0, checkpoint: str | None = None, items_path: str | None = None):
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
        """One batch of B distinct random users, one click each: seconds per step."""
        self.acc.clear()
        events = [self._event(u) for u in self.rng.sample(self.users, B)]
        t = time.perf_counter()
        res = self._run(events)
        total = time.perf_counter() - t
        self.acc["quality"] = res.quality_seconds  # the processor times its online quality counts itself
        out = {k: self.acc.get(k, 0.0) for k in STEPS}
        out["other"] = total - sum(out.values())
        out["total"] = total
        return out


def measure(lb: LiveBatches, sizes: list[int], reps: int = 60) -> list[dict]:
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


def profile(lb: LiveBatches, B: int, reps: int = 100, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        lb.batch(B)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def table(rows: list[dict]) -> str:
    head = ["batch", *STEPS, "other", "total"]
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
    ap.add_argument("--workdir", default="runs/livebatch")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lb = LiveBatches(work, a.users, a.items, a.model)
    rows = measure(lb, [int(x) for x in a.sizes.split(",")], a.reps)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.profile:
        print(profile(lb, a.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
