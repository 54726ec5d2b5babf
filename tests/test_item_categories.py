"""Item categories: the slot scorer's "same category as the latest item" feature, from the log's
column through the item table and the checkpoint to the live candidates (docs/MODELS.md)."""

import numpy as np
import pandas as pd
import pytest
import torch

from livemb.core.items import ItemTable
from livemb.models import EventBatch, ModelConfig, repeat
from livemb.models.base import EVENT_TYPES
from livemb.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from livemb.models.evaluation import build_model
from livemb.models.retrieval import Retriever
from livemb.models.serving import Serving
from livemb.tools.cli import main


def test_same_category_as_latest_by_hand():
    latest = torch.tensor([[False, True, False, False], [False, False, False, False], [True, False, False, False]])
    cats = torch.tensor([[1, 2, 2, 2], [2, 2, 2, 1], [0, 1, 0, 1]])
    filled = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    got = repeat.same_category_as_latest(latest, cats, filled)
    # row 0: the latest event's slot is category 2; the empty slot 3 scores 0 whatever its code
    # row 1: the latest event's item is not in the memory (a new item): its category is unknown
    # row 2: the latest event's item has no category: nothing matches it
    assert got.tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def _model(categories: np.ndarray | None, name: str = "gru"):
    rng = np.random.default_rng(0)
    D, N = 8, 40
    vecs = np.concatenate([np.zeros((1, D)), rng.normal(size=(N, D))]).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(name, vecs, categories, hidden=8).eval()
    ev = EventBatch.from_sequences([np.array([3, 7, 5, 3, 9])], [np.zeros(5, np.int64)],
                                   [np.arange(5) * 10_000])
    st, u = model.step(model.init_state(1), ev)
    return model, vecs, st, u


def test_a_model_reads_categories_only_when_given_them():
    codes = np.r_[0, np.arange(1, 41) % 4 + 1]
    model, _, st, u = _model(codes)
    plain, _, _, _ = _model(None)
    n = repeat.n_features(len(EVENT_TYPES))
    assert model.cfg.item_categories and model.repeat_head.slot[0].in_features == n + 1
    assert not plain.cfg.item_categories and plain.repeat_head.slot[0].in_features == n
    assert ModelConfig.from_dict({k: v for k, v in model.cfg.to_dict().items() if k != "item_categories"}) \
        .item_categories is False  # a checkpoint from before the field reads none
    with torch.no_grad():
        before = model.memory_scores(st, u)[1]
        # item 9 (the latest) moves to item 7's category: the memory's scores move
        moved = codes.copy()
        moved[9] = codes[7]
        model.set_item_categories(moved)
        after = model.memory_scores(st, u)[1]
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError, match="has none"):
        model.set_item_categories(None)


@pytest.mark.parametrize("name", ["hiertcn", "mv"])
def test_live_candidates_equal_the_full_ranking_with_categories(name):
    """the learned mixture (hiertcn) and the rule with its category term (mv): live == offline"""
    codes = np.r_[0, np.arange(1, 41) % 3 + 1]
    model, vecs, st, u = _model(codes, name)
    if name == "mv":
        model.rule = repeat.RuleWeights(count=0.0, recency=1.0, current_session=0.0, category=3.0)
        with torch.no_grad():
            plain = model.scores(st, u)[0].clone()
            model.set_item_categories(np.zeros_like(codes))  # every category unknown: no term
            assert not torch.equal(plain, model.scores(st, u)[0])
            model.set_item_categories(codes)
    items, scores = Retriever(vecs, "flat", 5, "none").candidates(model, st, u)
    with torch.no_grad():
        full = model.scores(st, u)[0]
    want = torch.topk(full, 5).indices.numpy()
    assert items[0].tolist() == want.tolist()
    np.testing.assert_allclose(scores[0], full[want].numpy(), rtol=1e-5)


def test_checkpoint_carries_the_choice_and_refuses_a_table_without_categories(tmp_path):
    codes = np.r_[0, np.arange(1, 41) % 4 + 1]
    model, vecs, st, u = _model(codes)
    save_checkpoint(tmp_path / "m.pt", model, "fp")
    back = load_checkpoint(tmp_path / "m.pt", vecs, "fp", categories=codes)
    with torch.no_grad():
        torch.testing.assert_close(back.memory_scores(st, u)[1], model.memory_scores(st, u)[1])
    with pytest.raises(CheckpointError, match="item categories"):
        load_checkpoint(tmp_path / "m.pt", vecs, "fp")
    plain, _, _, _ = _model(None)
    save_checkpoint(tmp_path / "p.pt", plain, "fp")
    assert not load_checkpoint(tmp_path / "p.pt", vecs, "fp", categories=codes).cfg.item_categories


def test_train_on_a_log_with_categories_then_serve_it(tmp_path, capsys):
    log, ckpt = tmp_path / "log.csv", tmp_path / "m.pt"
    assert main(["synth", "--users", "30", "--items", "60", "--days", "4", "--out", str(log)]) == 0
    df = pd.read_csv(log)
    df["cat"] = df["item_id"].astype(str).map(lambda s: f"c{sum(map(ord, s)) % 5}")  # deterministic
    df.to_csv(log, index=False)
    assert main(["train", "--data", str(log), "--columns", "user=user_id,item=item_id,ts=ts,category=cat",
                 "--model", "gru", "--out", str(ckpt), "--epochs", "1", "--dim", "8"]) == 0
    assert "reads 5 item categories" in capsys.readouterr().out
    items = ckpt.with_suffix(".items.npz")
    table = ItemTable.load(items)
    assert table.categories is not None and set(table.categories.tolist()) <= {f"c{k}" for k in range(5)}
    sv = Serving.load(str(ckpt), str(items))
    assert sv.model.cfg.item_categories
    assert sv.model.item_cats.tolist() == table.category_codes().tolist()
    out = tmp_path / "users.jsonl"
    assert main(["embed", "--data", str(log), "--items", str(items), "--model", str(ckpt), "--out", str(out)]) == 0
    assert len(out.read_bytes().splitlines()) == 30
