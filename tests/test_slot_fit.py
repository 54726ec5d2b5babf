"""The slot scorer's pre-fit (models/slot_fit.py): its targets are exactly the events whose next
item is in the memory, and fitting them teaches the scorer a behaviour planted in the data."""

import math

import numpy as np
import torch

from livemb.models import repeat
from livemb.models.base import EVENT_TYPES, ModelConfig
from livemb.models.hiertcn import HierTCN
from livemb.models.replay import MemoryCache
from livemb.models.slot_fit import MAX_PASSES, in_memory_targets, prefit_slot_scorer
from livemb.models.train import make_chunks


def _model(N=60, D=8, M=8, seed=0):
    rng = np.random.default_rng(seed)
    vecs = np.vstack([np.zeros((1, D)), rng.normal(size=(N, D))]).astype(np.float32)
    torch.manual_seed(seed)
    return HierTCN(ModelConfig(name="hiertcn", dim=D, hidden=16, channels=8, recent_items=M), vecs)


def test_targets_are_the_events_whose_next_item_is_in_the_memory_within_a_chunk():
    model = _model()
    ts = np.arange(7, dtype=np.int64) * 1000
    # chunks are cut from the end: chunk 1 = 5 7 3 3 5 (rows 0-4), chunk 2 = 5 3 (rows 5-6), each
    # with a memory that starts empty
    seqs = [(np.array([5, 3, 5, 7, 3, 3, 5]), np.zeros(7, np.int64), ts)]
    chunks = make_chunks(seqs, 5)
    assert [c[0].tolist() for c in chunks] == [[5, 7, 3, 3, 5], [5, 3]]
    memory = MemoryCache(model, chunks)
    rows, slots = in_memory_targets(memory, chunks)
    # after row 2 (memory 5 7 3) the next 3 is in it, after row 3 the next 5; row 4 ends chunk 1 (its
    # "next" row opens chunk 2); after row 5 (memory 5) the next 3 is not in it
    assert rows.tolist() == [2, 3]
    mem = memory.fields["mem_item"]
    assert mem[2, slots[0]].item() == 3 and mem[3, slots[1]].item() == 5


def test_prefit_learns_a_planted_return_pattern():
    """Users return to the item they touched two events ago: the pre-fitted scorer ranks the slot with
    recency 1 (two events ago) first, where the untrained one does not."""
    rng = np.random.default_rng(0)
    model = _model(N=200, M=8)
    seqs = []
    for _ in range(40):
        items = list(rng.integers(1, 201, 2))
        for _ in range(60):
            items.append(items[-2] if rng.random() < 0.7 else int(rng.integers(1, 201)))
        T = len(items)
        seqs.append((np.array(items), np.zeros(T, np.int64), np.arange(T, dtype=np.int64) * 1000))
    chunks = make_chunks(seqs, 200)
    memory = MemoryCache(model, chunks)
    rows, slots = in_memory_targets(memory, chunks)
    head = model.repeat_head

    def top1_is_recency_1() -> float:
        st = memory.state_at(rows, torch.device("cpu"))
        with torch.no_grad():
            logits, _ = head.slot_logits(repeat.memory_features(st, len(EVENT_TYPES)), st["mem_item"] > 0)
        recency = st["n_events"][:, None] - 1 - st["mem_seq"].long()
        return (recency.gather(1, logits.argmax(1, keepdim=True)) == 1).float().mean().item()

    before = top1_is_recency_1()
    out = prefit_slot_scorer(head, memory, chunks, steps=150, lr=1e-2, batch=256, seed=0, device=torch.device("cpu"))
    after = top1_is_recency_1()
    assert out["loss_last"] < out["loss_first"]
    assert before < 0.5 < 0.95 < after, (before, after)
    assert out["steps"] == 150
    # a small log gets at most MAX_PASSES passes over its targets, whatever the steps asked for
    capped = prefit_slot_scorer(head, memory, chunks, steps=10**6, lr=1e-3, batch=256, seed=0, device=torch.device("cpu"))
    assert capped["steps"] == math.ceil(MAX_PASSES * len(rows) / 256) < 10**6


def test_prefit_with_no_in_memory_target_is_a_no_op():
    model = _model()
    T = 10
    seqs = [(np.arange(1, T + 1), np.zeros(T, np.int64), np.arange(T, dtype=np.int64) * 1000)]  # never a repeat
    chunks = make_chunks(seqs, 200)
    memory = MemoryCache(model, chunks)
    before = [p.clone() for p in model.repeat_head.parameters()]
    out = prefit_slot_scorer(model.repeat_head, memory, chunks, steps=50, lr=1e-2, batch=64, seed=0,
                             device=torch.device("cpu"))
    assert out == {"targets": 0.0, "steps": 0.0}
    assert all(torch.equal(a, b) for a, b in zip(before, model.repeat_head.parameters(), strict=True))
