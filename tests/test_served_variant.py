"""The served variant (repeat path x exclude_seen) is chosen from the training data, follows the test
protocol on the held-out tail, travels in the checkpoint and is what the worker and `evaluate` use;
flags override it. Also: the relative patience and the all-events metrics."""

import numpy as np
import pytest
import torch

from livemb.core.errors import ConfigError
from livemb.core.items import ItemTable
from livemb.models.checkpoint import load_checkpoint, save_checkpoint
from livemb.models.early_stop import Validation, split_validation
from livemb.models.evaluation import build_model
from livemb.models.metrics import over_all_events
from livemb.models.repeat import Variant
from livemb.models.serving import Serving
from livemb.models.train import TrainConfig, patience, sequences_from_frame, served_variant, should_stop, train_model
from livemb.tools.data.synth_ecommerce import synth_ecommerce

CFG = TrainConfig(epochs=4, valid_fraction=0.2, valid_min_targets=50, refit=False)


@pytest.fixture(scope="module")
def logs():
    """A repeat-heavy shopping log and the same log with every repeat removed (a ratings-like log)."""
    df, ids, vectors = synth_ecommerce(users=200, items=2000, days=20, seed=3)
    table = ItemTable(ids, vectors)
    once = df.drop_duplicates(["user_id", "item_id"], keep="first").reset_index(drop=True)
    few = df[df["user_id"].isin(df["user_id"].unique()[:60])].reset_index(drop=True)
    return table, few, once


def _trained(table, df, name="gru"):
    torch.manual_seed(0)
    model = build_model(name, table.padded_vectors())
    hist = train_model(model, list(sequences_from_frame(df, table).values()), CFG, progress=False)
    return model, hist


def test_a_repeat_heavy_log_serves_a_repeat_path_without_a_mask(logs):
    table, df, _ = logs
    model, hist = _trained(table, df)
    assert model.served == Variant.parse(hist["served_variant"])
    assert model.served.repeat in ("rep", "rule") and model.served.exclude_seen == "none", model.served
    chosen = hist["early_stopping"]["valid"][hist["chosen_epoch"] - 1]["variants"]
    assert chosen[model.served.name]["recall@10"] > chosen["norep+history"]["recall@10"]


def test_a_log_without_repeats_serves_the_history_mask(logs):
    table, _, once = logs
    model, hist = _trained(table, once)
    assert model.served.exclude_seen == "history", model.served
    chosen = hist["early_stopping"]["valid"][hist["chosen_epoch"] - 1]["variants"]
    assert chosen[model.served.name]["recall@10"] > chosen["rep+none"]["recall@10"]


@pytest.mark.parametrize("name", ["last", "sknn"])
def test_a_model_with_nothing_to_train_still_chooses_its_variant(logs, name):
    """Counting models rank on the held-out tail too: the mask on the log without repeats, none on
    the repeat-heavy one, and the final counts come from the whole train period."""
    table, few, once = logs
    for df, mask in ((once, "history"), (few, "none")):
        model, hist = _trained(table, df, name)
        assert model.served.exclude_seen == mask, (name, model.served)
        assert hist["early_stopping"]["variant_chosen"]
        seen = hist["early_stopping"]["variants"]
        assert seen[model.served.name]["recall@10"] >= seen["rep+none" if mask == "history" else "rep+history"]["recall@10"]
    if name == "sknn":  # counted on the whole train period, not the fit part
        assert int(model.pop.sum()) == int((table.lookup(few["item_id"].to_numpy()) > 0).sum())


def test_a_counting_model_chooses_whatever_the_epoch_count(logs):
    """Epochs mean nothing to a model that only counts: `--epochs 1` must not skip its choice."""
    table, _, once = logs
    model = build_model("last", table.padded_vectors())
    hist = train_model(model, list(sequences_from_frame(once, table).values()),
                       TrainConfig(**{**CFG.__dict__, "epochs": 1}), progress=False)
    assert hist["early_stopping"]["variant_chosen"] and model.served.exclude_seen == "history"


def test_the_checkpoint_carries_the_variant_and_flags_override_it(logs, tmp_path):
    table, _, _ = logs
    model = build_model("gru", table.padded_vectors())
    model.served = Variant("rule", "history")
    table.save(tmp_path / "items.npz")
    save_checkpoint(tmp_path / "m.pt", model, table.fingerprint)
    loaded = load_checkpoint(tmp_path / "m.pt", table.padded_vectors(), table.fingerprint)
    assert loaded.served == Variant("rule", "history")
    sv = Serving.load(str(tmp_path / "m.pt"), str(tmp_path / "items.npz"))
    assert sv.model.served == Variant("rule", "history") and sv.model.served_mode == "rule"
    sv = Serving.load(str(tmp_path / "m.pt"), str(tmp_path / "items.npz"), exclude_seen="none", repeat_path="rep")
    assert sv.model.served == Variant("rep", "none") and sv.model.served_mode == "mixture"


def test_the_served_mask_removes_seen_items_from_live_candidates(logs, tmp_path):
    table, df, _ = logs
    model = build_model("gru", table.padded_vectors()).eval()
    seqs = list(sequences_from_frame(df, table).values())[:8]
    from livemb.models.evaluation import warm_up

    st, u = warm_up(model, model.init_state(len(seqs)), seqs)
    table.save(tmp_path / "items.npz")
    for variant in (Variant("rep", "none"), Variant("rep", "history")):
        model.served = variant
        save_checkpoint(tmp_path / "m.pt", model, table.fingerprint)
        sv = Serving.load(str(tmp_path / "m.pt"), str(tmp_path / "items.npz"), topk=50)
        items, _ = sv.retriever.candidates(sv.model, st, u)
        mem = st["mem_item"].numpy()
        shown = [np.isin(items[b][items[b] > 0], mem[b][mem[b] > 0]).any() for b in range(len(seqs))]
        assert any(shown) if variant.exclude_seen == "none" else not any(shown)


def test_variant_names_parse_and_refuse_nonsense():
    assert Variant.parse("norep+history") == Variant("norep", "history")
    assert Variant.parse("rule").name == "rule+none"
    assert Variant("rep").mode("mixture") == "mixture" and Variant("norep").mode("mixture") == "none"
    with pytest.raises(ValueError, match="variant"):
        Variant.parse("rep+everything")


def test_validation_items_new_in_its_window_are_unknown_there():
    """The validation's catalogue is what came before its window, as the test's is the train period's."""
    ts = np.arange(10, dtype=np.int64) * 1000
    a = (np.array([1, 2, 1, 3, 2, 1, 4, 1, 5, 4]), np.zeros(10, np.int64), ts)  # 4, 5 first occur late
    b = (np.array([2, 3, 2, 3, 2, 3, 2, 3, 2, 6]), np.zeros(10, np.int64), ts)  # 6 first occurs late
    split = split_validation([a, b], 0.4, 100, 0)  # cut at 5.4 s: events 6..9 are validation events
    assert split.cut_ms == 5400
    assert [v[0].tolist() for v in split.valid] == [[1, 2, 1, 3, 2, 1, 0, 1, 0, 0], [2, 3, 2, 3, 2, 3, 2, 3, 2, 0]]
    assert split.targets == 1 + 3  # known validation targets: a's item 1, b's 2, 3, 2
    assert [f[0].tolist() for f in split.fit] == [[1, 2, 1, 3, 2, 1], [2, 3, 2, 3, 2, 3]]


def test_the_default_variant_is_served_unless_another_is_better_by_more_than_the_noise():
    """Paired on the same 2,400 targets: a rival that wins 208 and loses 193 of the default's
    top-10 hits (+15 net, SE of the difference ~8 hits) is noise; one that wins 300 and loses 100 is not."""
    cfg = TrainConfig(valid_metric="recall@10", valid_min_gain_se=1.0)
    base = np.arange(2400) < 960  # the default's hits: recall@10 0.40

    def swapped(wins: int, losses: int) -> np.ndarray:
        hits = base.copy()
        hits[960:960 + wins] = True  # misses it turns into hits
        hits[:losses] = False  # hits it loses
        return hits

    def validation(**hits):
        ranks = {v: np.where(h, 1, 100) for v, h in hits.items()}
        return Validation({v: {"recall@10": float(h.mean()), "mrr": float((1 / r).mean())}
                           for (v, h), r in zip(hits.items(), ranks.values(), strict=True)}, ranks)

    near = validation(**{"rep+none": base, "rule+none": swapped(208, 193), "norep+history": base & False})
    far = validation(**{"rep+none": base, "rule+none": swapped(300, 100), "norep+history": base & False})
    assert served_variant(near, cfg) == "rep+none" and served_variant(far, cfg) == "rule+none"
    assert served_variant(near, TrainConfig(valid_metric="recall@10", valid_min_gain_se=0.0)) == "rule+none"


def test_patience_grows_with_the_best_epoch():
    cfg = TrainConfig(patience=2, patience_ratio=0.5)
    assert [patience(e, cfg) for e in (0, 1, 4, 5, 6, 9)] == [2, 2, 2, 3, 3, 5]
    assert patience(9, TrainConfig(patience=2, patience_ratio=0.0)) == 2


def test_no_stop_before_min_steps_however_long_the_patience_ran_out():
    cfg = TrainConfig(patience=2, patience_ratio=0.5, min_steps=300)
    assert not should_stop(4, 2, 4 * 14, cfg)  # patience spent, 56 steps: go on
    assert not should_stop(21, 2, 21 * 14, cfg)  # patience long spent, but 294 steps < 300
    assert should_stop(22, 2, 22 * 14, cfg)  # 308 steps, 20 epochs without a better one
    assert should_stop(3, 1, 3 * 400, cfg)  # a large log: patience alone decides
    assert not should_stop(3, 2, 3 * 400, cfg)
    assert should_stop(4, 2, 56, TrainConfig(patience=2, min_steps=0))
    with pytest.raises(ConfigError):
        TrainConfig(min_steps=-1)


def test_all_events_metrics_count_unknown_items_as_misses():
    s = {"recall@1": 0.5, "recall@10": 0.75, "mrr": 0.6, "mrp": 0.1, "events_scored": 4}
    out = over_all_events(s, 4)  # 4 scored (2 hits at rank 1, 3 in the top 10), 4 unknown
    assert out == {"recall@1": 0.25, "recall@10": 0.375, "mrr": 0.3, "events": 8}
    assert over_all_events({**s, "events_scored": 0}, 0)["recall@10"] == 0.0
