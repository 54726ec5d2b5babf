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


def test_category_context_by_hand():
    # one user, 5 slots: categories 1, 1, 2, 1 and an empty slot (category 1 on an empty slot counts
    # for nothing); slots 0 and 3 touched in the current session
    cats = torch.tensor([[1, 1, 2, 1, 1]])
    rec = torch.tensor([[0.0, 4.0, 2.0, 7.0, 1.0]])
    current = torch.tensor([[True, False, False, True, True]])
    filled = torch.tensor([[True, True, True, True, False]])
    got = repeat.context_features(repeat.category_counts(cats, rec, current, filled))
    log = np.log1p
    # per slot: log1p(# others in its category), log1p(# of them in the current session),
    # log1p(recency of the latest of them) (0 when none), any
    want = [[log(2), log(1), log(4), 1],  # slot 0: others 1 and 3; 3 is current; nearest 4
            [log(2), log(2), log(0), 1],  # slot 1: others 0 and 3, both current; nearest 0
            [0, 0, 0, 0],  # slot 2: alone in category 2
            [log(2), log(1), log(0), 1],  # slot 3: others 0 (current) and 1; nearest 0
            [0, 0, 0, 0]]  # the empty slot
    np.testing.assert_allclose(got[0].numpy(), np.array(want, np.float32), atol=1e-6)
    # a slot without a category (code 0) has no context and gives none
    none = repeat.category_counts(torch.tensor([[0, 0, 1]]), torch.tensor([[0.0, 1.0, 2.0]]),
                                   torch.tensor([[True, True, True]]), torch.tensor([[True, True, True]]))
    assert none.abs().sum() == 0
    empty = torch.zeros(0, 4, dtype=torch.long)  # no rows: nothing to compare
    assert repeat.category_counts(empty, empty, empty.bool(), empty.bool()).shape == (0, 4, 3)


def _pairwise_context(cats, rec, current, filled):
    """The definition, slot by slot (the reference for the sorted implementation)."""
    out = np.zeros((*cats.shape, repeat.CONTEXT_FEATURES), np.float32)
    for b, m in np.ndindex(*cats.shape):
        if not (filled[b, m] and cats[b, m] > 0):
            continue
        others = [j for j in range(cats.shape[1]) if j != m and filled[b, j] and cats[b, j] == cats[b, m]]
        if others:
            out[b, m] = [np.log1p(len(others)), np.log1p(sum(bool(current[b, j]) for j in others)),
                         np.log1p(min(rec[b, j] for j in others)), 1]
    return out


def test_category_context_equals_its_definition_on_random_memories():
    g = torch.Generator().manual_seed(0)
    for B, M, n_cats in [(64, 16, 3), (32, 64, 12), (8, 5, 1)]:
        cats = torch.randint(0, n_cats + 1, (B, M), generator=g)
        rec = torch.stack([torch.randperm(3 * M, generator=g)[:M] for _ in range(B)]).float()  # distinct, as event clocks are
        current = torch.rand(B, M, generator=g) < 0.4
        filled = torch.rand(B, M, generator=g) < 0.8
        got = repeat.context_features(repeat.category_counts(cats, rec, current, filled)).numpy()
        np.testing.assert_allclose(got, _pairwise_context(cats.numpy(), rec.numpy(), current.numpy(), filled.numpy()),
                                   atol=1e-6)


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
    assert model.cfg.item_categories and model.cfg.category_context
    assert model.repeat_head.slot[0].in_features == n + 1 + repeat.CONTEXT_FEATURES
    assert not plain.cfg.item_categories and plain.repeat_head.slot[0].in_features == n
    assert ModelConfig.from_dict({k: v for k, v in model.cfg.to_dict().items() if k != "item_categories"}) \
        .item_categories is False  # a checkpoint from before the field reads none
    older = ModelConfig.from_dict({k: v for k, v in model.cfg.to_dict().items() if k != "category_context"})
    assert older.item_categories and not older.category_context  # one from before the context: its features
    assert repeat.MixtureHead(len(EVENT_TYPES), 8, 8, categories=True).slot[0].in_features == n + 1
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


def test_new_items_in_the_pool_score_without_a_category():
    """The open catalogue's pool holds new-item keys (hashes, not item rows): a model that reads
    categories scores them with no category (and no context) instead of looking their key up."""
    from livemb.models import newitems

    codes = np.r_[0, np.arange(1, 41) % 3 + 1]
    model, _, _, _ = _model(codes, "hiertcn")
    key = torch.tensor([[newitems.keys_of(["a-new-item"])[0][0]]])
    assert key.item() >= len(codes)  # far outside the item rows
    ev = EventBatch(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
                    torch.tensor([[50_000]]), torch.ones(1, 1, dtype=torch.bool))
    state = newitems.with_pool(model.init_state(1))
    pool = newitems.update_pool(model, state, ev, key)
    state, u = model.step(state, ev)
    state.update(pool)
    with torch.no_grad():
        _, mem = model.memory_scores(state, u, novec=newitems.as_memory(state))
    assert torch.isfinite(mem[0, -newitems.NEW_SLOTS:]).sum() == 1  # the new item, scored


def test_a_replay_carries_the_category_counts_and_training_reads_them_unchanged():
    """MemoryCache computes the slot counts once; the training loss is the same as computed per batch."""
    from livemb.models.replay import MemoryCache
    from livemb.models.train import mixture_loss

    codes = np.r_[0, np.arange(1, 41) % 4 + 1]
    model, _, _, _ = _model(codes, "hiertcn")
    rng = np.random.default_rng(1)
    chunks = [(rng.integers(1, 41, n), rng.integers(0, 3, n), np.cumsum(rng.integers(1, 4_000_000, n)))
              for n in (30, 7, 55, 1)]
    memory = MemoryCache(model, chunks)
    rows = torch.arange(len(memory.common["n_events"]))
    st = memory.state_at(rows, torch.device("cpu"))
    assert repeat.CONTEXT_FIELD in st and st[repeat.CONTEXT_FIELD].abs().sum() > 0
    assert torch.equal(st[repeat.CONTEXT_FIELD], model.slot_category_counts({k: v for k, v in st.items()
                                                                              if k != repeat.CONTEXT_FIELD}))
    ev = EventBatch.from_sequences(*zip(*chunks, strict=True))
    loss, n = mixture_loss(model, ev, memory, memory.rows(list(range(len(chunks))), ev.item.shape[1]))
    memory.counts = None  # the same features, computed per batch
    again, _ = mixture_loss(model, ev, memory, memory.rows(list(range(len(chunks))), ev.item.shape[1]))
    assert n > 0 and torch.equal(loss, again)
    plain = MemoryCache(_model(None, "hiertcn")[0], chunks)
    assert plain.counts is None and repeat.CONTEXT_FIELD not in plain.state_at(rows[:3], torch.device("cpu"))
