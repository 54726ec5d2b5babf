import math

import numpy as np
import pytest
import torch

from livemb.models import MODEL_REGISTRY, EventBatch, ModelConfig
from livemb.models.baselines import split_sessions
from livemb.models.metrics import ranks_of
from livemb.models.repeat import seen_mask

N, D = 9, 4
GAP = 1_800_000
MIN = 60_000


def item_vectors(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(N + 1, D)).astype(np.float32)
    v[0] = 0.0
    return v


def seq(items, t0=0, step=MIN):
    items = np.asarray(items, np.int64)
    return items, np.zeros(len(items), np.int64), t0 + step * np.arange(len(items), dtype=np.int64)


def make(name, train=None, vecs=None, **kw):
    model = MODEL_REGISTRY[name](
        ModelConfig(name=name, dim=D, session_gap_ms=GAP), item_vectors() if vecs is None else vecs, **kw
    )
    assert model.trainable is False and model.embeds is False
    if train is not None:
        assert model.fit(train) is model
    return model


def run(model, histories):
    """Warm fresh states on per-user histories (lists of (items, ts)), return state, u."""
    B = len(histories)
    st = model.init_state(B)
    ev = EventBatch.from_sequences([h[0] for h in histories], [h[1] for h in histories], [h[2] for h in histories])
    return model.step(st, ev)


def top(scores: torch.Tensor, exclude: torch.Tensor | None = None) -> list[int]:
    s = scores.clone()
    if exclude is not None:
        s[exclude] = -math.inf
    return s.argmax(dim=1).tolist()


# a small training log: item 5 is the most popular; 3 -> 4 is the strong rule
TRAIN = [
    seq([1, 3, 4]),
    seq([3, 4, 7]),
    seq([5, 5, 5, 5, 5, 5]),
    seq([3, 0, 8], step=GAP + 1),  # every event its own session: no 3 -> 8 rule
    seq([6, 2]),
]


def test_split_sessions_matches_gap_rule():
    train = [
        (
            np.array([1, 2, 0, 3], np.int64),
            np.zeros(4, np.int64),
            np.array([0, 10, 10 + GAP + 1, 20 + GAP + 1], np.int64),
        ),
        (
            np.array([4, 5], np.int64),
            np.zeros(2, np.int64),
            np.array([5, 5 + GAP], np.int64),
        ),  # gap == GAP: same session
        (np.array([], np.int64), np.array([], np.int64), np.array([], np.int64)),
        # a late event does not move the session clock back: 9 is 2*GAP after the max so far -> new session
        (np.array([6, 7, 9], np.int64), np.zeros(3, np.int64), np.array([3 * GAP, 0, 5 * GAP], np.int64)),
    ]
    items, sess, start = split_sessions(train, GAP, N)
    assert items.tolist() == [1, 2, 3, 4, 5, 6, 7, 9]
    assert sess.tolist() == [0, 0, 1, 2, 2, 3, 3, 4]
    assert start.tolist() == [0, 10 + GAP + 1, 5, 3 * GAP, 5 * GAP]
    with pytest.raises(ValueError):
        split_sessions([seq([N + 1])], GAP, N)


def test_zero_embeddings_and_buffers():
    for name in ("pop", "sr", "sknn", "maxitem"):
        model = make(name, TRAIN)
        st, u = run(model, [seq([1, 3]), seq([2])])
        assert u.shape == (2, D) and bool((u == 0).all())
        ev = EventBatch.from_sequences([seq([1, 3])[0]], [seq([1, 3])[1]], [seq([1, 3])[2]])
        assert model(ev).shape == (1, 2, D) and bool((model(ev) == 0).all())
        buffers = dict(model.named_buffers())
        assert "pop" in buffers and not any("pop" in k for k, _ in model.named_parameters())
        assert "pop" not in model.state_dict()
        s = model.scores(st, u)
        assert s.shape == (2, N + 1) and s[:, 0].eq(-math.inf).all() and not torch.isnan(s).any()


def test_pop_predicts_most_popular():
    model = make("pop", TRAIN)
    st, u = run(model, [seq([1])])
    assert top(model.scores(st, u, repeat_mode="none")) == [5]
    assert model.pop[5] == 6 and model.pop[3] == 3 and model.pop[0] == 0
    # +rep: the user's recent item comes first
    assert top(model.scores(st, u)) == [1]
    fresh = model.init_state(1)
    assert top(model.scores(fresh, torch.zeros(1, D))) == [5]


def test_sr_rules_and_prediction():
    model = make("sr", TRAIN)
    st, u = run(model, [seq([1, 3]), seq([1]), seq([8]), seq([0])])
    s = model.scores(st, u, repeat_mode="none")
    # after 3: rules[3,4] = 2 (two direct follows), rules[3,7] = 0.5 -> 4 first, then 7
    assert top(s)[0] == 4
    assert s[0].argsort(descending=True)[:2].tolist() == [4, 7]
    # after 1: rules[1,3] = 1, rules[1,4] = 0.5
    assert s[1].argsort(descending=True)[:2].tolist() == [3, 4]
    # after 8 (no rules) and after only an unknown item: popularity fallback
    assert top(s)[2:] == [5, 5]
    # the session break blocks 3 -> 8; distance weights 1/d
    rows = torch.repeat_interleave(torch.arange(N + 1), model.rule_crow.diff())
    table = {(int(a), int(b)): float(v) for a, b, v in zip(rows, model.rule_col, model.rule_val, strict=True)}
    assert (3, 8) not in table
    assert (
        table[(3, 4)] == pytest.approx(2.0)
        and table[(1, 4)] == pytest.approx(0.5)
        and table[(3, 7)] == pytest.approx(0.5)
    )
    # +rep: recent items first, most recent (3) on top, then 1, then the rule's 4
    s_rep = model.scores(st, u)
    assert s_rep[0].argsort(descending=True)[:3].tolist() == [3, 1, 4]


def test_sr_streaming_in_pieces_equals_one_batch():
    model = make("sr", TRAIN)
    st_all, u = run(model, [seq([2, 1, 3])])
    st = model.init_state(1)
    for items, et, ts in zip(*seq([2, 1, 3]), strict=True):
        st, _ = model.step(st, EventBatch.from_sequences([np.array([items])], [np.array([et])], [np.array([ts])]))
    assert torch.equal(model.scores(st, u), model.scores(st_all, u))


def test_sknn_completes_matching_session():
    train = [seq([1, 2, 3]), seq([4, 5, 6]), seq([1, 2, 7, 8]), seq([9, 9, 9, 9])]
    model = make("sknn", train)
    # user 0: current session {4, 5} (an older session with 1 is before a gap); user 1: {1, 2}
    h0 = (np.array([1, 4, 5]), np.zeros(3, np.int64), np.array([0, GAP + 1, GAP + 2]))
    st, u = run(model, [h0, seq([1, 2])])
    s = model.scores(st, u, repeat_mode="none")
    ex = seen_mask(st, N + 1, "session")
    assert top(s, ex)[0] == 6
    assert ranks_of(s, torch.tensor([6, 3]), ex)[0] == 1
    # user 1: S1 = {1,2,3} sim 2/sqrt(6) beats S3 = {1,2,7,8} sim 2/sqrt(8): 3 first, then 7/8
    sims = s[1]
    assert top(s, ex)[1] == 3
    sim1, sim3 = 2 / math.sqrt(6), 2 / math.sqrt(8)
    assert (sims[3] / sims[1]).item() == pytest.approx(sim1 / (sim1 + sim3), rel=1e-4)  # 1 and 2 are in both neighbours
    assert sims[7] > sims[9] and sims[7] == pytest.approx(sims[8].item())
    # k = 1 keeps only the best neighbour: 7 gets only the popularity tie-break
    model1 = make("sknn", train, k=1)
    s1 = model1.scores(st, u, repeat_mode="none")
    assert s1[1, 7] < 1e-5 and top(s1, ex)[1] == 3
    # +rep puts the current/recent items first
    assert set(model.scores(st, u)[0].argsort(descending=True)[:3].tolist()) == {1, 4, 5}


def test_sknn_sample_size_and_empty_session():
    train = [seq([1, 2], t0=0), seq([1, 3], t0=10 * GAP)]
    model = make("sknn", train, sample_size=1)  # item 1 only indexes its most recent session (with 3)
    st, u = run(model, [seq([1]), seq([0])])
    s = model.scores(st, u, repeat_mode="none")
    ex = seen_mask(st, N + 1, "session")
    assert top(s, ex)[0] == 3
    assert s[0, 2] < 1e-5
    # a user whose session holds only an unknown item: popularity only (item 1 is the most popular)
    assert top(s)[1] == 1


def test_sknn_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    train = [seq(rng.integers(1, N + 1, 5), t0=i * 10 * GAP) for i in range(30)]
    hist = [seq(rng.integers(0, N + 1, 4)) for _ in range(5)]
    a = make("sknn", train, k=5)
    b = make("sknn", train, k=5, chunk=2)
    st, u = run(a, hist)
    assert torch.allclose(a.scores(st, u), b.scores(st, u))


def test_maxitem_nearest_neighbour_of_past_item():
    vecs = np.zeros((N + 1, D), np.float32)
    vecs[1:, :] = np.eye(D, dtype=np.float32)[np.arange(N) % D] * np.arange(1, N + 1, dtype=np.float32)[:, None] * 0.01
    vecs[1] = [1.0, 0.0, 0.0, 0.0]
    vecs[2] = [0.9, 0.1, 0.0, 0.0]  # the nearest neighbour of 1
    vecs[3] = [0.0, 1.0, 0.0, 0.0]
    vecs[4] = [0.0, 0.8, 0.2, 0.0]  # the nearest neighbour of 3
    vecs[5] = [-1.0, -1.0, 0.0, 0.0]
    model = make("maxitem", TRAIN, vecs=vecs)
    st, u = run(model, [seq([1]), seq([1, 3]), seq([0])])
    s = model.scores(st, u, repeat_mode="none")
    ex = seen_mask(st, N + 1, "history")
    assert top(s, ex)[:2] == [2, 2]  # for user 1: max(<x1,x2>=0.9, <x3,x4>=0.8)
    x = torch.from_numpy(vecs)
    expected = torch.maximum(x @ x[1], x @ x[3])
    assert torch.allclose(s[1, 1:], expected[1:] / expected[1:].abs().max(), atol=1e-6)
    # empty memory: all zeros except column 0
    assert s[2, 0] == -math.inf and bool((s[2, 1:] == 0).all())
    # +rep: user 1's recent items 3 (most recent) then 1 first
    assert model.scores(st, u)[1].argsort(descending=True)[:3].tolist() == [3, 1, 2]


def test_maxitem_running_max_equals_the_max_over_the_memory():
    """The evaluation's running max (init from the warm-up memory, one product per applied event)
    gives the scores the state alone gives, while every item still fits in the memory; an unknown
    item (0) changes nothing."""
    model = make("maxitem", TRAIN)
    warm = [seq([1, 2]), seq([0]), seq([3])]
    later = [[4, 0, 2], [5, 5, 0], [0, 0, 0]]
    st, u = run(model, warm)
    running = model.init_running(st)
    assert bool(torch.isneginf(running[1]).all())  # nothing in memory yet
    for t in range(3):
        item = torch.tensor([row[t] for row in later])
        st, u = model.step(st, EventBatch.from_sequences(*zip(*(seq([i], t0=(t + 5) * MIN) for i in item.tolist()),
                                                             strict=True)))
        model.update_running(running, item)
    want = model.scores(st, u, repeat_mode="none")
    got = model.scores(st, u, repeat_mode="none", running=running)
    assert torch.allclose(got, want, atol=1e-6)


def test_repeat_disabled_by_config():
    model = MODEL_REGISTRY["pop"](ModelConfig(name="pop", dim=D, repeat="none"), item_vectors()).fit(TRAIN)
    st, u = run(model, [seq([1])])
    assert top(model.scores(st, u)) == [5]
