"""The rule's order inside the memory (models.repeat.RuleWeights): the bonus by hand, the choice on
the held-out tail (one validation pass for every candidate, kept only when it beats the noise), the
checkpoint that carries it and the live candidates that use it."""

import math

import numpy as np
import pytest
import torch

from livemb.core.errors import ConfigError
from livemb.core.items import ItemTable
from livemb.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from livemb.models.early_stop import Validation, Validator, choose_rule, split_validation
from livemb.models.evaluation import build_model, warm_up
from livemb.models.repeat import DEFAULT_RULE, RULE_GRID, RULE_GRID_CATEGORIES, RuleWeights, Variant, heuristic_bonus
from livemb.models.serving import Serving
from livemb.models.train import sequences_from_frame
from livemb.tools.data.synth_ecommerce import synth_ecommerce


def _memory(count, seq, sess, n_events, session):
    item = torch.tensor([[i + 1 if c else 0 for i, c in enumerate(count)]])
    return {"mem_item": item, "mem_count": torch.tensor([count], dtype=torch.int16),
            "mem_seq": torch.tensor([seq], dtype=torch.int32), "mem_sess": torch.tensor([sess], dtype=torch.int32),
            "n_events": torch.tensor([n_events]), "session": torch.tensor([session])}


def test_the_bonus_by_hand():
    # slot 0: 3 touches, last 5 events ago, an earlier session; slot 1: 1 touch, the latest event,
    # this session; slot 2: empty
    st = _memory([3, 1, 0], [4, 9, -1], [2, 3, -1], n_events=10, session=3)
    got = heuristic_bonus(st, RuleWeights(count=3.0, recency=1.0, current_session=3.0))
    want = [1e3 + 3 * math.log(4) - math.log(6), 1e3 + 3 * math.log(2) - 0 + 3, 0.0]
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    # the default order: count first (slot 0 above slot 1); the chosen one here: slot 1 first
    default = heuristic_bonus(st, DEFAULT_RULE)
    assert default[0, 0] > default[0, 1] and got[0, 1] > got[0, 0]


def test_the_category_term_by_hand():
    # slot 1 is the latest event's item (category 7); slot 0 shares it, slot 2 does not
    st = _memory([3, 1, 2], [4, 9, 6], [2, 3, 3], n_events=10, session=3)
    cats = torch.tensor([[7, 7, 5]])
    w = RuleWeights(count=3.0, recency=1.0, current_session=0.0, category=3.0)
    got = heuristic_bonus(st, w, cats) - heuristic_bonus(st, RuleWeights(3.0, 1.0, 0.0))
    assert got[0].tolist() == pytest.approx([3.0, 3.0, 0.0])
    # no categories (a model that reads none): no term, whatever the weight
    assert torch.equal(heuristic_bonus(st, w), heuristic_bonus(st, RuleWeights(3.0, 1.0, 0.0)))


def test_the_grid_holds_the_default_and_weights_refuse_nonsense():
    assert DEFAULT_RULE in RULE_GRID and len(set(RULE_GRID)) == len(RULE_GRID)
    assert set(RULE_GRID) < set(RULE_GRID_CATEGORIES) and len(set(RULE_GRID_CATEGORIES)) == 2 * len(RULE_GRID)
    assert RuleWeights.from_dict(RuleWeights(3, 1, 3).to_dict()) == RuleWeights(3.0, 1.0, 3.0)
    assert RuleWeights.from_dict(RuleWeights(3, 1, 3, 3).to_dict()).category == 3.0
    # a checkpoint written before the category term
    assert RuleWeights.from_dict({"count": 3, "recency": 1, "current_session": 3}) == RuleWeights(3.0, 1.0, 3.0)
    for bad in ({"count": "many"}, {"count": 1, "speed": 2}, {"count": float("nan")}, "count 3"):
        with pytest.raises(ConfigError):
            RuleWeights.from_dict(bad)


def _validation(hits_by_variant: dict[str, np.ndarray]) -> Validation:
    ranks = {v: np.where(h, 1, 100) for v, h in hits_by_variant.items()}
    return Validation({v: {"recall@10": float(h.mean()), "mrr": float((1 / ranks[v]).mean())}
                       for v, h in hits_by_variant.items()}, ranks)


def test_a_rule_is_chosen_only_when_it_beats_the_default_by_more_than_the_noise():
    base = np.arange(2400) < 960
    near, far = base.copy(), base.copy()
    near[960:960 + 208], near[:193] = True, False  # +15 net of 2,400: within one SE
    far[960:960 + 300], far[:100] = True, False  # +200 net

    def vals(rival):
        # a counting model: its own path is the rule, so rep+... and rule+... both use it
        same = {"rep+none": base, "rule+none": base, "norep+none": base & False}
        better = {"rep+none": rival, "rule+none": rival, "norep+none": base & False}
        return {DEFAULT_RULE: _validation(same), RuleWeights(3, 1, 3): _validation(better)}

    assert choose_rule(vals(near), "rule", "recall@10", 1.0) == DEFAULT_RULE
    assert choose_rule(vals(far), "rule", "recall@10", 1.0) == RuleWeights(3, 1, 3)
    assert choose_rule(vals(near), "rule", "recall@10", 0.0) == RuleWeights(3, 1, 3)
    # a mixture model ranks with the rule in its `rule` variants only: its own path does not count
    mixed = {DEFAULT_RULE: _validation({"rep+none": far, "rule+none": base}),
             RuleWeights(3, 1, 3): _validation({"rep+none": far, "rule+none": base})}
    assert choose_rule(mixed, "mixture", "recall@10", 0.0) == DEFAULT_RULE


@pytest.fixture(scope="module")
def shop():
    df, ids, vectors = synth_ecommerce(users=80, items=1500, days=20, seed=5)
    table = ItemTable(ids, vectors)
    return table, list(sequences_from_frame(df, table).values())


@pytest.mark.parametrize("name", ["last", "gru"])
def test_one_pass_per_candidate_equals_a_pass_under_that_rule(shop, name):
    table, seqs = shop
    torch.manual_seed(0)
    model = build_model(name, table.padded_vectors()).eval()
    validator = Validator(model, split_validation(seqs, 0.2, 5000, seed=0))
    tuned = RuleWeights(1.0, 1.0, 3.0)
    both = validator.by_rule(model, (DEFAULT_RULE, tuned))
    assert model.rule == DEFAULT_RULE  # left as it was
    model.rule = tuned
    alone = validator(model)
    for v, ranks in alone.ranks.items():
        np.testing.assert_array_equal(both[tuned].ranks[v], ranks, err_msg=v)
        if v.startswith("norep"):  # no rule in it: the same under every candidate
            np.testing.assert_array_equal(both[DEFAULT_RULE].ranks[v], ranks, err_msg=v)
    # the candidates differ where the rule ranks (else the comparison above proves nothing)
    assert not np.array_equal(both[tuned].ranks["rule+none"], both[DEFAULT_RULE].ranks["rule+none"])


def test_the_checkpoint_carries_the_rule_and_live_candidates_use_it(shop, tmp_path):
    table, seqs = shop
    model = build_model("gru", table.padded_vectors()).eval()
    model.rule, model.served = RuleWeights(0.0, 1.0, 3.0), Variant("rule", "none")
    table.save(tmp_path / "items.npz")
    save_checkpoint(tmp_path / "m.pt", model, table.fingerprint)
    assert load_checkpoint(tmp_path / "m.pt", table.padded_vectors(), table.fingerprint).rule == model.rule
    sv = Serving.load(str(tmp_path / "m.pt"), str(tmp_path / "items.npz"), topk=20)
    st, u = warm_up(model, model.init_state(8), seqs[:8])
    items, _ = sv.retriever.candidates(sv.model, st, u)
    tuned = model.scores(st, u, "rule")
    np.testing.assert_array_equal(items, tuned.topk(20, dim=1).indices.numpy())  # in order
    # ... which the default order would not give
    model.rule = DEFAULT_RULE
    assert not np.array_equal(items, model.scores(st, u, "rule").topk(20, dim=1).indices.numpy())


def test_a_checkpoint_without_a_rule_serves_the_default_and_a_bad_one_is_refused(shop, tmp_path):
    table, _ = shop
    model = build_model("gru", table.padded_vectors())
    save_checkpoint(tmp_path / "m.pt", model, table.fingerprint)
    blob = read_checkpoint(tmp_path / "m.pt")
    del blob["rule"]
    torch.save(blob, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", table.padded_vectors(), table.fingerprint).rule == DEFAULT_RULE
    blob["rule"] = {"count": "x"}
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="rule weights"):
        load_checkpoint(tmp_path / "bad.pt", table.padded_vectors(), table.fingerprint)
