"""The mixture gate's serving-time shift (SeqModel.gate_shift): what it does to the scores, the
choice on the held-out tail (one pass per shift, kept only beyond the noise), the relaxed epoch
judge that comes with it, the checkpoint that carries it and the live candidates that use it."""

import numpy as np
import pytest
import torch

from livemb.core.items import ItemTable
from livemb.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from livemb.models.early_stop import EpochJudge, Validation, Validator, split_validation
from livemb.models.evaluation import build_model, warm_up
from livemb.models.repeat import GATE_SHIFT_GRID
from livemb.models.serving import Serving
from livemb.models.train import TrainConfig, gate_shift_choice, gate_shifts, sequences_from_frame, train_model
from livemb.tools.data.synth_ecommerce import synth_ecommerce


@pytest.fixture(scope="module")
def shop():
    df, ids, vectors = synth_ecommerce(users=80, items=1500, days=20, seed=5)
    table = ItemTable(ids, vectors)
    return table, list(sequences_from_frame(df, table).values())


@pytest.fixture(scope="module")
def warm(shop):
    table, seqs = shop
    torch.manual_seed(0)
    model = build_model("gru", table.padded_vectors()).eval()  # repeat = mixture: a learned gate
    st, u = warm_up(model, model.init_state(16), seqs[:16])
    return model, st, u


@torch.no_grad()
def _gate(model, st, u):
    """g per user from memory_scores: its explore shift is log(1 - g) - log Z."""
    logz = model.log_partition(model.explore_scores(u))
    shift, mem = model.memory_scores(st, u, "mixture", logz)
    return 1 - torch.exp(shift + logz), mem


def test_the_shift_moves_the_gate_logit_when_scoring_and_never_in_training(warm):
    model, st, u = warm
    g0, mem0 = _gate(model, st, u)
    try:
        model.gate_shift = 2.0
        g2, mem2 = _gate(model, st, u)
        np.testing.assert_allclose(torch.logit(g2, eps=0).numpy(), (torch.logit(g0, eps=0) + 2.0).numpy(), atol=2e-3)
        assert not torch.equal(mem0, mem2)
        model.train()  # training learns the raw gate: the shift does nothing there
        gt, memt = _gate(model, st, u)
        torch.testing.assert_close(gt, g0)
        torch.testing.assert_close(memt, mem0)
    finally:
        model.gate_shift = 0.0
        model.eval()


def test_one_pass_per_shift_equals_a_pass_under_that_shift(shop, warm):
    table, seqs = shop
    model = warm[0]
    validator = Validator(model, split_validation(seqs, 0.2, 5000, seed=0))
    both = validator.by_gate_shift(model, (0.0, 4.0))
    assert model.gate_shift == 0.0  # left as it was
    try:
        model.gate_shift = 4.0
        alone = validator(model)
    finally:
        model.gate_shift = 0.0
    for v, ranks in alone.ranks.items():
        np.testing.assert_array_equal(both[4.0].ranks[v], ranks, err_msg=v)
        if not v.startswith("rep"):  # no gate in it: the same under every shift
            np.testing.assert_array_equal(both[0.0].ranks[v], ranks, err_msg=v)
    assert not np.array_equal(both[4.0].ranks["rep+none"], both[0.0].ranks["rep+none"])


def _validation(hits: np.ndarray) -> Validation:
    ranks = np.where(hits, 1, 100)
    metrics = {"recall@10": float(hits.mean()), "mrr": float((1 / ranks).mean())}
    return Validation({"rep+none": metrics}, {"rep+none": ranks})


def test_a_shift_is_chosen_only_when_it_beats_no_shift_by_more_than_the_noise():
    base = np.arange(2400) < 960
    near, far = base.copy(), base.copy()
    near[960:960 + 208], near[:193] = True, False  # +15 net of 2,400: within one SE
    far[960:960 + 300], far[:100] = True, False  # +200 net
    cfg = TrainConfig(valid_metric="recall@10")
    assert gate_shift_choice({0.0: _validation(base), 2.0: _validation(near)}, cfg) == 0.0
    assert gate_shift_choice({0.0: _validation(base), 2.0: _validation(far)}, cfg) == 2.0
    assert gate_shift_choice({0.0: _validation(base), 2.0: _validation(near)}, TrainConfig(valid_metric="recall@10",
                                                                                             valid_min_gain_se=0)) == 2.0


def test_the_relaxed_judge_takes_a_served_loss_within_the_noise_for_the_embedding():
    rng = np.random.default_rng(0)
    served, emb = rng.random(900), rng.random(900)
    z = rng.standard_normal(900)
    worse = served - 0.001 + 0.05 * (z - z.mean())  # a loss of exactly 0.001 against an SE of ~0.0017
    better_emb = emb + 0.1
    strict, relaxed = EpochJudge(1.0), EpochJudge(1.0, allow_loss_se=1.0)
    for judge in (strict, relaxed):
        judge(served, emb)  # the first epoch
    assert strict(worse, better_emb).by is None
    assert relaxed(worse, better_emb).by == "embedding"
    # a loss beyond the noise is never taken
    judge = EpochJudge(1.0, allow_loss_se=1.0)
    judge(served, emb)
    assert judge(served - 0.2 + 0.05 * (z - z.mean()), better_emb).by is None


def test_training_with_calibrate_gate_records_and_keeps_the_chosen_shift(shop):
    table, seqs = shop
    torch.manual_seed(0)
    model = build_model("gru", table.padded_vectors())
    # on by default: a model with a learned gate is judged under every shift of the grid
    assert gate_shifts(model, TrainConfig()) == GATE_SHIFT_GRID
    assert gate_shifts(model, TrainConfig(calibrate_gate=False)) == (0.0,)
    hist = train_model(model, seqs, TrainConfig(epochs=3, batch_size=32, seed=0,
                                                valid_fraction=0.2, valid_min_targets=50), progress=False)
    es = hist["early_stopping"]
    assert es["used"] and es["gate_shift"] in GATE_SHIFT_GRID
    assert all(e["gate_shift"] in GATE_SHIFT_GRID for e in es["valid"])
    assert model.gate_shift == es["gate_shift"]
    assert es["gate_shift"] == next(e["gate_shift"] for e in es["valid"] if e["epoch"] == hist["chosen_epoch"])
    # off: no shift anywhere
    torch.manual_seed(0)
    plain = build_model("gru", table.padded_vectors())
    hist = train_model(plain, seqs, TrainConfig(epochs=3, batch_size=32, seed=0, valid_fraction=0.2,
                                                valid_min_targets=50, calibrate_gate=False), progress=False)
    assert plain.gate_shift == 0.0 and all(e["gate_shift"] == 0.0 for e in hist["early_stopping"]["valid"])


def test_the_checkpoint_carries_the_shift_and_live_candidates_use_it(shop, warm, tmp_path):
    table, _ = shop
    model, st, u = warm
    table.save(tmp_path / "items.npz")
    try:
        model.gate_shift = 4.0
        save_checkpoint(tmp_path / "m.pt", model, table.fingerprint)
        assert load_checkpoint(tmp_path / "m.pt", table.padded_vectors(), table.fingerprint).gate_shift == 4.0
        sv = Serving.load(str(tmp_path / "m.pt"), str(tmp_path / "items.npz"), topk=20)
        items, _ = sv.retriever.candidates(sv.model, st, u)
        want = model.scores(st, u).topk(20, dim=1).indices.numpy()
        np.testing.assert_array_equal(items, want)  # in order
        model.gate_shift = 0.0  # ... which the gate as trained would not give
        assert not np.array_equal(items, model.scores(st, u).topk(20, dim=1).indices.numpy())
    finally:
        model.gate_shift = 0.0


def test_a_checkpoint_without_a_shift_serves_the_gate_as_trained_and_a_bad_one_is_refused(shop, warm, tmp_path):
    table, _ = shop
    save_checkpoint(tmp_path / "m.pt", warm[0], table.fingerprint)
    blob = read_checkpoint(tmp_path / "m.pt")
    del blob["gate_shift"]
    torch.save(blob, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", table.padded_vectors(), table.fingerprint).gate_shift == 0.0
    for bad in (float("nan"), "2", True):
        blob["gate_shift"] = bad
        torch.save(blob, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match="gate_shift"):
            load_checkpoint(tmp_path / "bad.pt", table.padded_vectors(), table.fingerprint)
