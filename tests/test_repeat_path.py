"""The learned repeat/explore mixture against the fixed "recent items first" rule (issue 8).

On the e-commerce synthetic log (tools/data/synth_ecommerce.py: a quarter of the events are repeats at
realistic distances, typed events, a long tail of new items) the mixture must beat the fixed rule
applied to the same model's explore path, and the counting baselines with the rule, by a margin.
Fixed seeds; everything runs on the CPU in well under a minute."""

import pytest

from livemb.core.items import ItemTable
from livemb.models.train import TrainConfig
from livemb.tools.data.synth_ecommerce import synth_ecommerce
from livemb.tools.offline.evaluate import run_evaluation


@pytest.fixture(scope="module")
def report():
    df, ids, vectors = synth_ecommerce(users=150, items=8000, days=30, seed=1)
    cfg = TrainConfig(epochs=4, batch_size=32, seed=0)
    return run_evaluation(df, ItemTable(ids, vectors), ["gru", "pop", "sr"], cfg, progress=False)


def test_learned_mixture_beats_the_fixed_rule(report):
    v = report["results"]["gru"]["variants"]
    learned, rule = v["rep+none"], v["rule+none"]
    print({k: (round(learned[k], 4), round(rule[k], 4)) for k in ("recall@10", "mrr")})
    assert learned["recall@10"] >= rule["recall@10"] + 0.05
    assert learned["mrr"] >= rule["mrr"] + 0.03


def test_learned_mixture_beats_counting_baselines_with_the_rule(report):
    ours = report["results"]["gru"]["variants"]["rep+none"]
    for name in ("pop", "sr"):
        theirs = report["results"][name]["variants"]["rep+none"]
        assert ours["recall@10"] >= theirs["recall@10"] + 0.05, name
        assert ours["mrr"] >= theirs["mrr"] + 0.03, name
