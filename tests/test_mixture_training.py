"""The fast mixture-training path (models/train.mixture_loss, models/logits.py) computes what the
plain formulation computes: the serving definition `SeqModel.memory_scores` with the (n, M, D)
gather of the memory's vectors and autograd through the full-catalogue log-sum-exp."""

import math

import numpy as np
import torch

from livemb.models import EventBatch, repeat
from livemb.models.base import ModelConfig
from livemb.models.hiertcn import HierTCN
from livemb.models.logits import explore_logz
from livemb.models.replay import MemoryCache, first_seen_ms, next_item_predictions
from livemb.models.train import TrainConfig, make_chunks, mixture_loss, slot_explore


def _setup(N=300, D=8, users=6, T=40, seed=0):
    rng = np.random.default_rng(seed)
    vecs = np.vstack([np.zeros((1, D)), rng.normal(size=(N, D))]).astype(np.float32)
    torch.manual_seed(seed)
    model = HierTCN(ModelConfig(name="hiertcn", dim=D, hidden=16, channels=8, recent_items=8), vecs)
    seqs = []
    for _ in range(users):
        items = rng.integers(1, 12, T)  # few distinct items: repeats and LRU evictions (M = 8)
        ts = np.cumsum(rng.choice([1_000, 4_000_000], T, p=[0.8, 0.2])).astype(np.int64)
        seqs.append((items, rng.integers(0, 4, T), ts))
    chunks = make_chunks(seqs, 25)
    memory = MemoryCache(model, chunks)
    ids = list(range(len(chunks)))
    ev = EventBatch.from_sequences(*zip(*chunks, strict=True))
    return model, memory, ev, memory.rows(ids, ev.item.shape[1])


def _reference_loss(model, ev, memory, rows):
    """The plain formulation: full memory, gathered slot vectors, autograd log-sum-exp."""
    pred, gate, sel, target = next_item_predictions(model, ev)
    u_t, tgt = pred[sel], target[sel]
    st = memory.state_at(rows[:, :-1][sel], model.device)
    s = model.explore_scores(u_t)
    logz = torch.logsumexp(s[:, 1:], dim=1)
    shift, mem = model.memory_scores(st, u_t, "mixture", logz, gate[sel])
    in_mem = st["mem_item"].long() == tgt[:, None]
    mem_lp = mem.masked_fill(~in_mem, -math.inf).amax(dim=1)
    logp = torch.where(in_mem.any(dim=1), mem_lp, s.gather(1, tgt[:, None]).squeeze(1) + shift)
    return -logp.mean()


def test_slot_explore_equals_the_gather_of_the_memory_vectors():
    model, memory, ev, rows = _setup()
    pred, _, sel, target = next_item_predictions(model, ev)
    st = memory.state_at(rows[:, :-1][sel], model.device)
    slots, tgt_score = slot_explore(pred, ev.item, model.item_vecs, sel, st["mem_seq"])
    u_t = pred[sel]
    filled = st["mem_item"] > 0
    ref = (model.item_vecs[st["mem_item"].long()] * u_t[:, None]).sum(-1)
    assert filled.sum() > 0
    torch.testing.assert_close(slots[filled], ref[filled], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tgt_score, (u_t * model.item_vecs[target[sel]]).sum(-1), rtol=1e-5, atol=1e-5)


def test_trimming_empty_slots_changes_no_score():
    model, memory, ev, rows = _setup()
    st = memory.state_at(rows[:3, :4].reshape(-1), model.device)  # early positions: trailing slots empty
    trimmed = repeat.trim_empty_slots(st)
    assert trimmed["mem_item"].shape[1] < st["mem_item"].shape[1]
    u = torch.randn(len(st["n_events"]), model.cfg.dim)
    gs = torch.randn(len(u), model.cfg.hidden)
    with torch.no_grad():
        full, small = model.memory_scores(st, u, gate_state=gs), model.memory_scores(trimmed, u, gate_state=gs)
    torch.testing.assert_close(full[0], small[0])
    k = trimmed["mem_item"].shape[1]
    torch.testing.assert_close(full[1][:, :k], small[1])
    assert torch.isneginf(full[1][:, k:]).all()


def test_explore_logz_matches_autograd():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    vecs = torch.randn(11, 5, dtype=torch.float64, generator=g)
    pick = torch.randint(0, 11, (7, 3), generator=g)
    drop = (torch.tensor([1, 4]), torch.tensor([2, 9]))
    assert torch.autograd.gradcheck(lambda x: explore_logz(x, vecs, pick, 0.7, drop), (u,))
    s = u @ vecs.T + 0.7
    s = s.index_put(drop, torch.tensor(-math.inf, dtype=s.dtype))
    logz, picked = explore_logz(u, vecs, pick, 0.7, drop)
    torch.testing.assert_close(logz, torch.logsumexp(s, dim=1))
    torch.testing.assert_close(picked, (u @ vecs.T).gather(1, pick))


def test_fast_mixture_loss_equals_the_plain_one_with_its_gradients():
    model, memory, ev, rows = _setup()
    fast, n = mixture_loss(model, ev, memory, rows, TrainConfig())
    assert n > 0
    grads_fast = torch.autograd.grad(fast, [p for p in model.parameters()], allow_unused=True)
    ref = _reference_loss(model, ev, memory, rows)
    grads_ref = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_first_occurrences_train_the_explore_path_alone():
    """With `first_seen`, a target that is its item's first occurrence scores its explore
    log-softmax over the catalogue (no gate, no memory); the other targets keep the mixture."""
    model, memory, ev, rows = _setup()
    mixture, n = mixture_loss(model, ev, memory, rows, TrainConfig())
    never_new = torch.full((model.n_items + 1,), -1, dtype=torch.int64)  # every item seen before every target
    same, n2 = mixture_loss(model, ev, memory, rows, TrainConfig(), first_seen=never_new)
    torch.testing.assert_close(same, mixture)
    always_new = torch.full((model.n_items + 1,), 2**62, dtype=torch.int64)  # every target a first occurrence
    cold, n3 = mixture_loss(model, ev, memory, rows, TrainConfig(), first_seen=always_new)
    pred, _, sel, target = next_item_predictions(model, ev)
    ref = -torch.log_softmax(model.explore_scores(pred[sel])[:, 1:], dim=1).gather(1, target[sel][:, None] - 1).mean()
    assert n == n2 == n3 and not torch.allclose(cold, mixture)
    torch.testing.assert_close(cold, ref, rtol=1e-5, atol=1e-5)


def test_first_seen_is_each_items_earliest_time():
    seqs = [(np.array([1, 2, 1]), np.zeros(3, np.int64), np.array([10, 20, 30])),
            (np.array([2, 3]), np.zeros(2, np.int64), np.array([5, 40]))]
    never = np.iinfo(np.int64).max
    assert first_seen_ms(seqs, 4).tolist() == [never, 10, 5, 40, never]
