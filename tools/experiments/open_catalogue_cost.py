"""What the open catalogue (models/newitems.py) costs the live batch step: processor time per
micro-batch with it off, on, and on with the new items' stream vectors (models/newvectors.py), on the events of a real log whose item table holds only the items
of its train part (so the test part's new items are what the worker meets), and the stored row.

    python -m livemb.tools.experiments.open_catalogue_cost --data LOG [--columns ..] [--ts-unit s]

The model is an untrained HierTCN (the step's cost depends on the shapes, not on the weights) over
random unit vectors of the train part's items. Batches alternate between the settings, each with its own
processor, so both see the same load; the figures are the mean process (CPU) time per batch (the
CPU clock can tick coarsely: a mean over many batches, not a median) and the median wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from livemb.core.events import ValidEvent
from livemb.core.items import ItemTable
from livemb.core.settings import Settings
from livemb.models.checkpoint import save_checkpoint
from livemb.models.evaluation import build_model
from livemb.stream.processor import ModelProcessor
from livemb.tools.data.eventlog import load_log, temporal_split
from livemb.tools.experiments import process_setup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--columns")
    p.add_argument("--ts-unit", choices=["s", "ms"], default="ms")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="passes over the test part per setting")
    a = p.parse_args(argv)
    process_setup()
    torch.set_num_threads(1)
    df = load_log(a.data, a.columns, a.ts_unit)
    train, test = temporal_split(df, 0.2)
    ids = np.unique(train["item_id"].astype(str).to_numpy())
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((len(ids), 64)).astype(np.float32)
    table = ItemTable(ids, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    tmp = Path(tempfile.mkdtemp())
    table.save(tmp / "items.npz")
    save_checkpoint(tmp / "m.pt", build_model("hiertcn", table.padded_vectors()), table.fingerprint)
    base = Settings(model_path=str(tmp / "m.pt"), items_path=str(tmp / "items.npz"))
    events = [ValidEvent(str(r.user_id), r.item_id, int(r.ts), r.event_type, f"e{i}", 0, i)
              for i, r in enumerate(test.itertuples(index=False))]
    new_share = float((table.lookup(test["item_id"].to_numpy()) == 0).mean())
    modes = {"off": {"open_catalogue": False}, "on": {"open_catalogue": True},
             "on+vectors": {"open_catalogue": True, "new_item_vectors": True}}
    procs = {on: ModelProcessor(base.model_copy(update=upd)) for on, upd in modes.items()}
    rows: dict[str, dict[str, bytes]] = {m: {} for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    indexed = 0
    for _ in range(a.rounds):
        rows = {m: {} for m in modes}  # each round replays the test part from empty states
        for i in range(0, len(events), a.batch):
            batch = events[i : i + a.batch]
            for on in modes:
                t0, w0 = time.process_time(), time.perf_counter()
                res = procs[on].process(batch, {e.user_id: rows[on].get(e.user_id) for e in batch})
                if res.new_item_evidence is not None:  # the fold of the record it reads back from the topic
                    procs[on].apply_evidence(res.new_item_evidence)
                    indexed = procs[on].indexed
                times[on].append(time.process_time() - t0)
                walls[on].append(time.perf_counter() - w0)
                rows[on].update(res.states)
    print(f"new items with a stream vector at the end (the last round's worker): {indexed}")
    for on in modes:
        cpu, wall = float(np.sum(times[on])), float(np.median(walls[on]))
        size = np.array([len(b) for b in rows[on].values()])
        print(f"open_catalogue={on}: {len(events)} events ({new_share:.1%} new items) x {a.rounds}, batch {a.batch}: "
              f"CPU {cpu / len(times[on]) * 1e3:.1f} ms / batch, {cpu / (len(events) * a.rounds) * 1e6:.1f} us / event; "
              f"wall median {wall * 1e3:.1f} ms / batch ({len(times[on])} batches); state record {int(size.max())} bytes")


if __name__ == "__main__":
    main()
