import math

import numpy as np
import pytest
import torch

from livemb.models.metrics import RankAccumulator, ranks_of

INF = math.inf


def test_ranks_basic_and_column_zero_ignored():
    # column 0 has a huge score but never counts
    s = torch.tensor([[100.0, 0.1, 0.9, 0.5, 0.3], [100.0, 0.4, 0.3, 0.2, 0.1]])
    r = ranks_of(s, torch.tensor([2, 4]))
    assert r.tolist() == [1, 4]
    assert r.dtype == torch.int64


def test_ranks_ties_are_pessimistic():
    s = torch.tensor([[-INF, 0.5, 0.5, 0.5, 0.1], [-INF, 1.0, 1.0, 1.0, 1.0], [-INF, 0.2, 0.7, 0.7, 0.0]])
    r = ranks_of(s, torch.tensor([1, 4, 4]))
    # row 0: items 2 and 3 tie with the target -> rank 3; row 1: all tie -> N; row 2: 3 others >= 0.0
    assert r.tolist() == [3, 4, 4]


def test_ranks_excluded_competitors_and_target():
    s = torch.tensor([[-INF, 0.9, 0.8, 0.7, 0.6], [-INF, 0.9, 0.8, 0.7, 0.6], [-INF, 0.9, 0.8, 0.7, 0.6]])
    ex = torch.zeros(3, 5, dtype=torch.bool)
    ex[0, [1, 2]] = True  # the two better items are excluded
    ex[1, 3] = True  # the target itself is excluded -> worst rank N
    ex[2, 0] = True  # excluding the unknown column changes nothing
    r = ranks_of(s, torch.tensor([3, 3, 3]), ex)
    assert r.tolist() == [1, 4, 3]
    assert ranks_of(s, torch.tensor([3, 3, 3])).tolist() == [3, 3, 3]


def test_ranks_nan_loses():
    nan = math.nan
    s = torch.tensor([[-INF, 0.9, nan, 0.1, 0.2], [-INF, nan, 0.5, 0.1, 0.2], [-INF, nan, nan, nan, nan]])
    r = ranks_of(s, torch.tensor([1, 1, 3]))
    # row 0: the NaN competitor counts as >= -> rank 2; row 1: NaN target loses to all 3 others
    assert r.tolist() == [2, 4, 4]


def test_ranks_neg_inf_target_is_worst_when_all_minus_inf():
    s = torch.tensor([[-INF, -INF, -INF, 3.0]])
    assert ranks_of(s, torch.tensor([1])).tolist() == [3]
    assert ranks_of(s, torch.tensor([3])).tolist() == [1]


def test_ranks_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    B, N = 7, 30
    s = torch.randint(0, 5, (B, N + 1), generator=g).float()  # many ties
    t = torch.randint(1, N + 1, (B,), generator=g)
    ex = torch.rand(B, N + 1, generator=g) < 0.2
    r = ranks_of(s, t, ex)
    for b in range(B):
        ti = int(t[b])
        if ex[b, ti]:
            assert r[b] == N
            continue
        others = [i for i in range(1, N + 1) if i != ti and not ex[b, i] and s[b, i] >= s[b, ti]]
        assert r[b] == 1 + len(others)


def test_accumulator_summary_hand_computed():
    acc = RankAccumulator()
    acc.add(torch.tensor([1, 2, 5]))
    acc.add(np.array([10, 20, 100]))
    acc.add(torch.tensor([], dtype=torch.int64))
    out = acc.summary(n_items=200)
    assert out["events_scored"] == 6
    assert out["recall@1"] == pytest.approx(1 / 6)
    assert out["recall@5"] == pytest.approx(3 / 6)
    assert out["recall@10"] == pytest.approx(4 / 6)
    assert out["recall@20"] == pytest.approx(5 / 6)
    assert out["mrr"] == pytest.approx((1 + 0.5 + 0.2 + 0.1 + 0.05 + 0.01) / 6)
    assert out["mrp"] == pytest.approx((1 + 2 + 5 + 10 + 20 + 100) / 6 / 200)
    assert set(out) == {"recall@1", "recall@5", "recall@10", "recall@20", "mrr", "mrp", "events_scored"}


def test_accumulator_empty_and_merge():
    acc = RankAccumulator()
    out = acc.summary(10)
    assert out["events_scored"] == 0 and out["mrr"] == 0.0
    a, b = RankAccumulator(), RankAccumulator()
    a.add(torch.tensor([1, 3]))
    b.add(torch.tensor([7]))
    a.merge(b)
    both = RankAccumulator()
    both.add(torch.tensor([1, 3, 7]))
    assert a.summary(10) == both.summary(10)
    with pytest.raises(ValueError):
        a.add(torch.tensor([0]))


def test_ranks_excluding_memory_equal_masked_ranks():
    """The evaluation's fast exclude_seen ranks == ranks_of with the full (B, N+1) seen mask."""
    from livemb.models import repeat
    from livemb.models.metrics import ranks_excluding_memory

    g = torch.Generator().manual_seed(0)
    B, N, M = 40, 30, 6
    scores = torch.randint(0, 5, (B, N + 1), generator=g).float()  # many ties
    scores[:, 0] = -float("inf")
    scores[3, 7] = float("nan")
    mem = torch.stack([torch.randperm(N, generator=g)[:M] + 1 for _ in range(B)])
    mem[::4, -2:] = 0  # empty slots
    st = {"mem_item": mem, "mem_sess": torch.randint(0, 2, (B, M), generator=g), "session": torch.ones(B, dtype=torch.long)}
    target = torch.where(torch.rand(B, generator=g) < 0.5, mem[:, 0], torch.randint(1, N + 1, (B,), generator=g))
    target[5] = 0
    fast = ranks_excluding_memory(scores, target, mem, {e: repeat.excluded_slots(st, e) for e in ("session", "history")})
    for e in ("none", "session", "history"):
        assert torch.equal(fast[e], ranks_of(scores, target, repeat.seen_mask(st, N + 1, e))), e


def test_ranks_from_explore_equal_ranks_of_the_merged_scores():
    """The evaluation's one-comparison ranks == ranks_of on the merged (B, N+1) matrix (explore +
    shift outside the memory, the slot scores inside), with ties, NaNs, empty slots and masks.
    Integer-valued scores and shifts keep the float arithmetic exact, so equality is exact."""
    from livemb.models import repeat
    from livemb.models.metrics import ranks_from_explore

    g = torch.Generator().manual_seed(1)
    B, N, M = 60, 30, 6
    base = torch.randint(0, 6, (B, N + 1), generator=g).float()
    base[:, 0] = -float("inf")
    base[3, 7] = float("nan")
    mem_item = torch.stack([torch.randperm(N, generator=g)[:M] + 1 for _ in range(B)])
    mem_item[::4, -2:] = 0
    shift = torch.randint(-3, 3, (B,), generator=g).float()
    shift[::5] = 0.0
    mem = torch.randint(0, 9, (B, M), generator=g).float().masked_fill(mem_item == 0, -float("inf"))
    mem[8, 1] = float("nan")
    st = {"mem_item": mem_item, "mem_sess": torch.randint(0, 2, (B, M), generator=g), "session": torch.ones(B, dtype=torch.long)}
    target = torch.where(torch.rand(B, generator=g) < 0.5, mem_item[:, 0], torch.randint(1, N + 1, (B,), generator=g))
    target[5] = 0
    target[9] = 7
    base[9, 7] = float("nan")  # a NaN target outside the memory
    merged = base + shift[:, None]
    merged.scatter_(1, mem_item, mem)
    merged[:, 0] = -float("inf")
    fast = ranks_from_explore(base, target, mem_item, shift, mem, {e: repeat.excluded_slots(st, e) for e in ("session", "history")})
    for e in ("none", "session", "history"):
        assert torch.equal(fast[e], ranks_of(merged, target, repeat.seen_mask(st, N + 1, e))), e


def test_count_below_equals_the_bool_sum():
    from livemb.models.metrics import count_below

    g = torch.Generator().manual_seed(2)
    for B, N in ((1, 1), (3, 2039), (5, 2041), (7, 5000), (2, 12345)):
        x = torch.randint(0, 7, (B, N), generator=g).float()
        x[0, 0] = float("nan")
        x[-1, -1] = -float("inf")
        thr = torch.randint(0, 7, (B, 1), generator=g).float()
        thr[0, 0] = float("nan") if B > 2 else thr[0, 0]
        assert torch.equal(count_below(x, thr), (x < thr).sum(dim=1)), (B, N)
    x = torch.zeros(2, 300_000)  # every lane at its fullest: 255 words of all-ones bytes
    assert torch.equal(count_below(x, torch.ones(2, 1)), torch.full((2,), 300_000))
