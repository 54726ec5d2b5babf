"""Parity (SPEC section 4): streaming step == offline forward, every embedding model.

Random histories with session breaks, late events, unknown items and event types; the streaming
side applies them in random chunks of 1-4 events per user per step (several events per user in
one step included), exactly as micro-batches would."""

import numpy as np
import pytest
import torch

from livemb.models import MODEL_REGISTRY, EventBatch, ModelConfig
from livemb.models.base import session_flags

EMBEDDING_MODELS = [n for n, c in MODEL_REGISTRY.items() if c.embeds]


def random_histories(seed: int, B: int = 7, N: int = 40):
    rng = np.random.default_rng(seed)
    items, etypes, ts = [], [], []
    for _ in range(B):
        T = int(rng.integers(1, 40))
        gaps = rng.choice([15_000, 3_600_000, -20_000], size=T, p=[0.75, 0.18, 0.07])  # in-session, break, late
        items.append(rng.integers(0, N + 1, size=T))  # 0 = unknown item
        etypes.append(rng.integers(0, 5, size=T))
        ts.append(1_700_000_000_000 + np.cumsum(gaps))
    return EventBatch.from_sequences(items, etypes, ts), rng


def tiny_model(name: str, rng, **cfg):
    """A small, untrained model over 40 random 12-d item vectors (index 0 = unknown)."""
    D = 12
    vecs = np.concatenate([np.zeros((1, D)), rng.normal(size=(40, D))]).astype(np.float32)
    return MODEL_REGISTRY[name](ModelConfig(name=name, dim=D, hidden=16, channels=10, **cfg), vecs).eval()


def stream_all(model, ev, rng):
    st = model.init_state(ev.item.shape[0])
    outs, t, T = [], 0, ev.item.shape[1]
    while t < T:
        k = int(rng.integers(1, 5))
        st, u = model.step(st, ev.slice(t, min(T, t + k)), return_all=True)
        outs.append(u)
        t += k
    return st, torch.cat(outs, dim=1)


def test_registry_covers_the_spec():
    expected = {"hiertcn", "hiergru", "hgru", "hrnn", "gru", "tcn", "mv", "maxitem", "last", "sr", "sknn", "pop"}
    assert expected <= set(MODEL_REGISTRY)
    assert set(EMBEDDING_MODELS) == {"hiertcn", "hiergru", "hgru", "hrnn", "gru", "tcn", "mv", "last"}


@pytest.mark.parametrize("name", EMBEDDING_MODELS)
@pytest.mark.parametrize("agg", ["items", "outputs"])
def test_step_equals_forward(name, agg):
    if agg == "outputs" and name not in ("hiertcn", "hiergru"):
        pytest.skip("agg only applies to the hierarchy")
    torch.manual_seed(0)
    ev, rng = random_histories(seed=len(name))
    model = tiny_model(name, rng, agg=agg)
    with torch.no_grad():
        offline = model(ev)
        _, streamed = stream_all(model, ev, rng)
    diff = ((offline - streamed).abs() * ev.mask[..., None]).max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"
    assert torch.isfinite(offline).all()


@pytest.mark.parametrize("name", [n for n in EMBEDDING_MODELS if MODEL_REGISTRY[n].gate_field])
def test_gate_state_equals_offline(name):
    """The repeat gate reads the same long-term state offline (training) and from the streaming state."""
    torch.manual_seed(2)
    ev, rng = random_histories(seed=11)
    model = tiny_model(name, rng)
    B, T = ev.item.shape
    with torch.no_grad():
        gate = model.forward_full(ev).gate
        st = model.init_state(B)
        for t in range(T):
            st, _ = model.step(st, ev.slice(t, t + 1))
            m = ev.mask[:, t]
            assert (model.gate_state(st)[m] - gate[m, t]).abs().max() <= 1e-4


def test_session_flags_rules():
    # first event, in-session, exactly the gap (no break), over the gap, late event, then back
    ts = torch.tensor([[0, 1000, 1000 + 1_800_000, 1000 + 3_600_001, 500, 1000 + 3_600_002]])
    mask = torch.ones_like(ts, dtype=torch.bool)
    new, level = session_flags(ts, mask, torch.tensor([-1]), 1_800_000, 16)
    assert new.tolist() == [[True, False, False, True, False, False]]
    assert level[0, 0] == 0 and level[0, 1] == 1 + 1  # 1 + floor(log2(1 + 1 s))
    assert level[0, 4] == 1  # late: negative gap clamps to 0 s


def test_memory_eviction_is_lru_and_counts():
    from livemb.models import repeat

    M = 3
    st = {"n_events": torch.zeros(1, dtype=torch.long), **repeat.init_memory(1, M, torch.device("cpu"))}
    seq = [5, 6, 5, 7, 8]  # 8 evicts the least recently used (6)
    for k, it in enumerate(seq):
        upd = repeat.update_memory(st, torch.tensor([it]), torch.tensor([k]), torch.tensor([0]), torch.tensor([0]),
                                   torch.tensor([k]))
        st.update(upd)
    held = dict(zip(st["mem_item"][0].tolist(), st["mem_count"][0].tolist(), strict=True))
    assert held == {5: 2, 7: 1, 8: 1}


@pytest.mark.parametrize("name", ["hiertcn", "hiergru"])
def test_next_session_embedding_matches_offline_starts(name):
    """The query-time session-start embedding: streaming (from state) == offline (from the grid)."""
    torch.manual_seed(1)
    ev, rng = random_histories(seed=5)
    model = tiny_model(name, rng)
    B, T = ev.item.shape
    with torch.no_grad():
        starts = model.forward_full(ev).starts
        opens, _ = session_flags(ev.ts, ev.mask, torch.full((B,), -1), model.cfg.session_gap_ms, 16)
        st = model.init_state(B)
        checked = 0
        for t in range(T):
            peek = model.next_session_embedding(st)
            sel = opens[:, t]
            if sel.any():
                assert (peek[sel] - starts[sel, t]).abs().max() <= 1e-4
                checked += int(sel.sum())
            st, _ = model.step(st, ev.slice(t, t + 1))
    assert checked > B  # first sessions and later ones


@pytest.mark.parametrize("presorted", [False, True])
@pytest.mark.parametrize("name", list(MODEL_REGISTRY))
def test_ragged_step_equals_the_general_loop(name, presorted, monkeypatch):
    """A batch where users have different event counts (a backfill) steps only the users with an
    event at t, sorted by count (`SeqModel._step_ragged`): the same states and embeddings as the
    general loop that steps every user and merges by mask, and the offline forward's u after each
    user's last event of the chunk."""
    torch.manual_seed(3)
    ev, rng = random_histories(seed=17, B=9)
    if presorted:  # users already in order of decreasing length: the sort leaves every chunk as it is
        order = torch.argsort(ev.mask.sum(1), descending=True, stable=True)
        ev = EventBatch(*(x[order] for x in (ev.item, ev.etype, ev.ts, ev.mask)))
    model = tiny_model(name, rng)
    B, T = ev.item.shape
    st_fast, st_slow = model.init_state(B), model.init_state(B)
    ragged_calls = []
    real = type(model)._step_ragged
    monkeypatch.setattr(type(model), "_step_ragged", lambda self, *a: ragged_calls.append(1) or real(self, *a))
    with torch.no_grad():
        offline = model(ev) if model.embeds else None
    t, chunks, wide = 0, 0, 0
    while t < T:
        k = int(rng.integers(2, 7))
        chunk = ev.slice(t, min(T, t + k))
        assert chunk.mask.sum(1).unique().numel() > 1 or t + k >= T  # ragged chunks, users in mixed order
        given = {key: v.clone() for key, v in st_fast.items()}
        with torch.no_grad():
            new_fast, u_fast = model.step(st_fast, chunk)
        assert all(torch.equal(st_fast[key], given[key]) for key in given)  # in-place writes never reach the caller's state
        st_fast = new_fast
        with torch.enable_grad():  # the general loop (the ragged path is for inference only)
            st_slow, u_slow = model.step(st_slow, chunk)
        for key in st_slow:
            assert st_fast[key].dtype == st_slow[key].dtype, key
            assert torch.allclose(st_fast[key].double(), st_slow[key].detach().double(), atol=1e-6), (name, key)
        assert torch.allclose(u_fast, u_slow.detach(), atol=1e-6)
        n = chunk.mask.sum(1)
        has = n > 0
        if offline is not None and has.any():
            last = (t + n - 1).clamp(min=0)
            want = offline[torch.arange(B), last]
            assert (u_fast[has] - want[has]).abs().max() <= 1e-4
            assert (u_fast[~has] == 0).all()
        t, chunks, wide = t + k, chunks + 1, wide + (chunk.item.shape[1] > 1)
    assert chunks > 3 and len(ragged_calls) == wide  # every no-grad chunk of 2+ events took the ragged path
