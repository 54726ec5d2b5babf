"""Event-type signal (issue 8, item 3): the synthetic log can plant a strong type effect
(`cart_return`), and the evaluation reports the targets right after each event type."""

import numpy as np
import pandas as pd
import pytest

from livemb.core.items import ItemTable
from livemb.models.base import EVENT_TYPES, event_type_index
from livemb.models.train import TrainConfig
from livemb.tools.data.synth_ecommerce import synth_ecommerce
from livemb.tools.offline.evaluate import event_type_table, run_evaluation


def _next_is_same_after(df: pd.DataFrame, etype: str) -> float:
    d = df.sort_values(["user_id", "ts"], kind="stable")
    prev_t = d.groupby("user_id")["event_type"].shift(1)
    prev_i = d.groupby("user_id")["item_id"].shift(1)
    m = (prev_t == etype).to_numpy()
    return float((d["item_id"] == prev_i).to_numpy()[m].mean())


def test_cart_return_plants_the_return_to_the_carted_item():
    plain, _, _ = synth_ecommerce(users=150, items=8000, days=20, seed=3)
    strong, _, _ = synth_ecommerce(users=150, items=8000, days=20, seed=3, cart_return=0.7)
    assert _next_is_same_after(plain, "cart") < 0.25
    assert _next_is_same_after(strong, "cart") > 0.65
    assert _next_is_same_after(strong, "view") < 0.15  # views keep their (weak) return rate
    # re-touches after a purchase are redrawn (as a new item: a small catalogue can redraw the same one)
    assert _next_is_same_after(strong, "purchase") < 0.03
    with pytest.raises(ValueError):
        synth_ecommerce(users=5, items=100, days=5, cart_return=1.5)


@pytest.fixture(scope="module")
def report():
    df, ids, vectors = synth_ecommerce(users=80, items=2000, days=20, seed=4, cart_return=0.7)
    return run_evaluation(df, ItemTable(ids, vectors), ["last"], TrainConfig(epochs=1), progress=False)


def test_evaluation_reports_targets_by_the_previous_event_type(report):
    res = report["results"]["last"]
    by = res["after_event_type"]["rep+none"]
    assert {"view", "cart"} <= set(by)
    n = sum(m["events_scored"] for m in by.values())
    assert 0 < n <= res["events_scored"]  # a test user without history has no previous event at first
    # the split is a partition of the scored targets: the weighted recall is the overall one
    if n == res["events_scored"]:
        w = sum(m["recall@10"] * m["events_scored"] for m in by.values()) / n
        assert np.isclose(w, res["recall@10"])
    # the rule puts the most recent items first: after a cart the target is mostly that item
    assert by["cart"]["recall@10"] > by["view"]["recall@10"]
    table = event_type_table(report)
    assert "after cart" in table and "| last |" in table


def test_dropping_event_types_keeps_the_grouping_by_the_real_types(report):
    """`last` + rule reads no event type, so with the types hidden from it the per-type figures
    must be the same targets and the same ranks."""
    df, ids, vectors = synth_ecommerce(users=80, items=2000, days=20, seed=4, cart_return=0.7)
    dropped = run_evaluation(df, ItemTable(ids, vectors), ["last"], TrainConfig(epochs=1), progress=False,
                             drop_event_types=True)
    assert dropped["dataset"]["event_types_dropped"]
    assert dropped["results"]["last"]["after_event_type"] == report["results"]["last"]["after_event_type"]


def test_memory_split_partitions_the_targets(report):
    res = report["results"]["last"]
    split = res["by_memory"]["rep+none"]
    assert split["in_memory"]["events_scored"] + split["not_in_memory"]["events_scored"] == res["events_scored"]
    assert split["in_memory"]["events_scored"] / res["events_scored"] == pytest.approx(res["memory_hit_rate"], abs=1e-4)
    # the rule puts every memory item above the catalogue: what it gains, it gains on memory targets
    assert split["in_memory"]["recall@10"] > split["not_in_memory"]["recall@10"]


def test_public_log_aliases_map_to_the_model_types():
    got = event_type_index(["pv", "PV", "fav", "buy", "cart", "addtocart", "detail", "nonsense"])
    assert [EVENT_TYPES[i] for i in got] == ["view", "view", "other", "purchase", "cart", "cart", "view", "other"]
