"""Pre-fit of the repeat head's slot scorer: which of the user's own items comes back next.

The slot scorer (repeat.MixtureHead.slot / slot_out) reads behaviour features only (count,
recency, time, sessions, event types), so it can be fitted before the sequence model, from the
replayed memory alone: for every training event whose next item is already in the memory, a
softmax over the memory's slots with the target's slot as the label (listwise cross-entropy).
Inside the mixture's NLL it gets the same signal, but only as many optimizer steps as the
sequence model takes: 14 an epoch on taobao-dev, ~140 by the chosen epoch, where the same MLP
fitted alone still gains up to ~500 steps (docs/MODELS.md, "The slot scorer is fitted alone
first"). The pre-fit costs ~1-4 s and the joint training goes on from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from livemb.models import repeat
from livemb.models.base import EVENT_TYPES
from livemb.models.replay import MemoryCache, Sequence

log = logging.getLogger(__name__)

MAX_PASSES = 50


def in_memory_targets(memory: MemoryCache, chunks: list[Sequence]) -> tuple[Tensor, Tensor]:
    """(rows (n,), slots (n,)): the MemoryCache rows after which the next event's item is in the
    memory, and the slot that holds it."""
    items = torch.from_numpy(np.concatenate([np.asarray(c[0], dtype=np.int64) for c in chunks]))  # (E,)
    nxt = torch.zeros_like(items)
    nxt[:-1] = items[1:]
    ends = torch.from_numpy(memory.offsets[1:] - 1) if len(chunks) > 1 else torch.zeros(0, dtype=torch.int64)
    nxt[ends] = 0  # the last event of a chunk has no next event in it
    nxt[-1] = 0
    hit = (memory.fields["mem_item"] == nxt[:, None]) & (nxt > 0)[:, None]  # (E, M)
    rows = hit.any(dim=1).nonzero().squeeze(1)
    return rows, hit[rows].to(torch.int8).argmax(dim=1)


def prefit_slot_scorer(head: repeat.MixtureHead, memory: MemoryCache, chunks: list[Sequence], steps: int,
                       lr: float, batch: int, seed: int, device: torch.device,
                       slot_features: Callable[[dict[str, Tensor]], Tensor] | None = None) -> dict[str, float]:
    """`steps` Adam steps (at most MAX_PASSES passes over the targets) of listwise cross-entropy on
    the slot scorer's parameters (in place). `slot_features`: the model's (SeqModel.slot_features);
    None: the behaviour features without categories.
    Returns what the log and the training history record."""
    rows, slots = in_memory_targets(memory, chunks)
    # at most MAX_PASSES passes over the targets: a small log gets a few steps (taobao-dev's 6,180
    # targets take the full 500, 41 passes of 512)
    steps = min(steps, math.ceil(MAX_PASSES * len(rows) / batch))
    if steps <= 0 or len(rows) == 0:
        return {"targets": float(len(rows)), "steps": 0.0}
    t0 = time.perf_counter()
    params = list(head.slot.parameters()) + list(head.slot_out.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    first = math.nan
    for step in range(steps):
        pick = torch.randint(len(rows), (min(batch, len(rows)),), generator=gen)
        st = repeat.trim_empty_slots(memory.state_at(rows[pick], device))
        feats = repeat.memory_features(st, len(EVENT_TYPES)) if slot_features is None else slot_features(st)  # (b, M', F)
        logits, _ = head.slot_logits(feats, st["mem_item"] > 0)  # (b, M')
        loss = F.cross_entropy(logits, slots[pick].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()  # one device sync at each end, none per step
    last = loss.item()
    out = {"targets": float(len(rows)), "steps": float(steps), "loss_first": first, "loss_last": last,
           "seconds": time.perf_counter() - t0}
    log.info("slot scorer pre-fit: %d in-memory targets, %d steps, loss %.4f -> %.4f (%.1fs)",
             len(rows), steps, first, last, out["seconds"])
    return out
