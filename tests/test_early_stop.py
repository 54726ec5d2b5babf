"""Early stopping (models/early_stop.py): the chosen epoch is the validation argmax, the weights kept
are that epoch's, refit = a fixed run of that many epochs, the validation metric is the
evaluation's, and a train period too small to split falls back to fixed epochs. Small, seconds."""

import logging

import numpy as np
import pytest
import torch

from livemb.core.items import ItemTable
from livemb.models.early_stop import EpochJudge, Validator, paired_gain, per_target, split_validation
from livemb.models.evaluation import build_model, evaluate_model
from livemb.models.train import TrainConfig, WeightAverage, sequences_from_frame, train_model
from livemb.tools.data.item_embeddings import build_item_vectors, vectors_before
from livemb.tools.data.synth_ecommerce import synth_ecommerce

# a high lr so that the validation curve is not monotone (epoch 5 of 6 is the best here)
# valid_min_gain_se = 0: any gain counts, so the choice is the argmax (the SE rule has its own test)
# weight_average = 0: the averaged weights smooth that curve into a monotone one (tested below)
# slot_prefit_steps = 0: these tests read the shape of one curve; the pre-fit (tests/test_slot_fit.py)
# moves it, and with it epoch 6 of 6 was the best, which leaves the restore below nothing to prove
# the gate as trained (no shift, the strict clause): these tests pin the epoch rule itself on a known
# curve; the gate's calibration has its own (tests/test_gate_shift.py)
# min_steps = 0: patience alone (the minimum has its own test)
CFG = TrainConfig(epochs=6, patience=6, lr=6e-2, valid_fraction=0.2, valid_min_targets=50, refit=False,
                  valid_min_gain_se=0.0, weight_average=0.0, slot_prefit_steps=0, calibrate_gate=False,
                  min_steps=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the worker runs (stream/processor.py): MKL's sums depend on the thread
    count, and these tests compare two paths' rankings exactly (a near-tie can flip) and read the
    shape of one validation curve. Without it they passed inside the whole suite (an earlier test
    leaves torch at one thread) and failed alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    df, ids, vectors = synth_ecommerce(users=60, items=2000, days=20, seed=3)
    table = ItemTable(ids, vectors)
    return table.padded_vectors(), list(sequences_from_frame(df, table).values())


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fixed(vectors, seqs, epochs, name="gru"):
    torch.manual_seed(0)
    model = build_model(name, vectors)
    train_model(model, seqs, TrainConfig(epochs=epochs, lr=CFG.lr, valid_fraction=0.0, weight_average=0.0,
                                         slot_prefit_steps=CFG.slot_prefit_steps),
                progress=False)
    return model


@pytest.fixture(scope="module")
def stopped(data):
    vectors, seqs = data
    torch.manual_seed(0)
    model = build_model("gru", vectors)
    hist = train_model(model, seqs, CFG, progress=False)
    return model, hist


def test_chosen_epoch_is_the_validation_argmax(stopped):
    _, hist = stopped
    es = hist["early_stopping"]
    values = [v[CFG.valid_metric] for v in es["valid"]]
    assert es["used"] and len(values) == CFG.epochs  # patience = epochs: every epoch ran
    assert hist["chosen_epoch"] == int(np.argmax(values)) + 1  # first maximum: a tie keeps the earlier epoch
    assert hist["chosen_epoch"] < CFG.epochs  # else the restore below would prove nothing


def test_paired_gain_is_the_mean_difference_and_its_standard_error():
    new, ref = np.array([1.0, 0.5, 0.0, 1.0]), np.array([0.5, 0.5, 0.0, 0.5])
    gain, need = paired_gain(new, ref, 1.0)  # differences 0.5, 0, 0, 0.5: mean 0.25, sd 0.2887, n 4
    assert gain == pytest.approx(0.25) and need == pytest.approx(0.2887 / 2, abs=1e-4)
    assert paired_gain(new, ref, 2.0)[1] == pytest.approx(2 * need)
    assert paired_gain(new, ref, 0.0) == (pytest.approx(0.25), 0.0)
    assert paired_gain(ref, ref, 1.0) == (0.0, 0.0)  # identical rankings: no gain, no noise
    assert per_target(np.array([1, 4, 20]), "mrr").tolist() == [1.0, 0.25, 0.05]
    assert per_target(np.array([1, 10, 11]), "recall@10").tolist() == [1.0, 1.0, 0.0]


def test_epoch_judge_keeps_training_the_embedding_while_the_served_ranking_holds():
    """Hand-made per-target values (4 targets, 1 SE of the paired difference)."""
    judge = EpochJudge(1.0)
    served0, emb0 = np.array([0.5, 0.5, 1.0, 0.0]), np.array([0.0, 0.1, 0.2, 0.0])
    assert judge(served0, emb0).by == "served"  # the first epoch
    # served: differences +0.5, 0, 0, 0 -> gain 0.125, need 0.25 / 2 = 0.125: not beyond the noise;
    # embedding: +0.5 on every target -> gain 0.5, need 0 (no spread): chosen by the embedding
    v = judge(np.array([1.0, 0.5, 1.0, 0.0]), emb0 + 0.5)
    assert (v.chosen, v.by) == (True, "embedding") and v.gain == pytest.approx(0.125) and v.min_gain == pytest.approx(0.125)
    assert judge.served_ref is served0  # the served reference moves only on a served gain
    # served worse beyond the noise (every target -0.1): the embedding's gain does not count
    v = judge(served0 - 0.1, emb0 + 1.0)
    assert (v.chosen, v.by) == (False, None)
    # served slightly worse, within the noise (gain -0.025, need 0.025): the embedding's gain does not
    # count either, else a run of such epochs could drift the served ranking down
    v = judge(served0 + np.array([-0.1, 0.0, 0.0, 0.0]), emb0 + 1.0)
    assert (v.chosen, v.by) == (False, None) and -v.min_gain <= v.gain < 0
    # served held (a -0.05 / +0.05 wash), the embedding not better than the chosen epoch's: not chosen
    v = judge(served0 + np.array([-0.05, 0.05, -0.05, 0.05]), emb0 + 0.5)
    assert (v.chosen, v.by) == (False, None)
    # a served gain beyond the noise moves both references
    better = served0 + np.array([0.5, 0.4, 0.5, 0.6])
    assert judge(better, emb0).by == "served" and judge.served_ref is better and judge.embedding_ref is emb0
    # without an embedding ranking (a model that has none) only the served clause applies
    assert judge(better + 0.01 * np.array([1, -1, 1, -1]), None).chosen is False


def test_a_gain_within_the_standard_error_is_not_an_improvement(data):
    """With the default rule (1 SE of the paired difference) the chosen epoch is the last one whose
    gain over the best so far exceeded what the noise allows; later epochs count as no gain."""
    vectors, seqs = data
    torch.manual_seed(0)
    model = build_model("gru", vectors)
    cfg = TrainConfig(**{**CFG.__dict__, "valid_min_gain_se": 1.0})
    hist = train_model(model, seqs, cfg, progress=False)
    es = hist["early_stopping"]
    chosen = 0
    for v in es["valid"]:
        if v["chosen_by"] == "served":  # better beyond the noise
            assert v["gain"] is None or v["gain"] > v["min_gain"]
        elif v["chosen_by"] == "embedding":  # held within the noise, the embedding better (EpochJudge)
            assert 0 <= v["gain"] <= v["min_gain"]
        else:
            assert v["gain"] <= v["min_gain"]
        if v["chosen_by"] is not None:
            chosen = v["epoch"]
    assert hist["chosen_epoch"] == chosen and es["min_gain_se"] == 1.0
    assert all(v["min_gain"] > 0 for v in es["valid"][1:])
    argmax = int(np.argmax([v[cfg.valid_metric] for v in es["valid"]])) + 1
    by_served = max(v["epoch"] for v in es["valid"] if v["chosen_by"] == "served")
    assert by_served < argmax  # on this curve the rule matters: a later epoch is higher, within the noise


def test_kept_weights_are_the_chosen_epochs(data, stopped):
    vectors, seqs = data
    model, hist = stopped
    split = split_validation(seqs, CFG.valid_fraction, CFG.valid_max_targets, CFG.seed)
    same = _fixed(vectors, split.fit, hist["chosen_epoch"])  # the same seeds, stopped at the chosen epoch
    last = _fixed(vectors, split.fit, CFG.epochs)
    kept = _weights(model)
    assert all(torch.equal(kept[k], v) for k, v in same.state_dict().items())
    assert not all(torch.equal(kept[k], v) for k, v in last.state_dict().items())
    recorded = hist["early_stopping"]["valid"][hist["chosen_epoch"] - 1]
    assert recorded["variant"] == hist["served_variant"] == model.served.name
    got = Validator(model, split)(model).metrics[recorded["variant"]]["recall@10"]
    assert got == pytest.approx(recorded["recall@10"], abs=1e-12)


def test_patience_stops_and_refit_retrains_from_the_start(data):
    vectors, seqs = data
    torch.manual_seed(0)
    model = build_model("gru", vectors)
    cfg = TrainConfig(**{**CFG.__dict__, "patience": 1, "patience_ratio": 0.0, "refit": True})
    hist = train_model(model, seqs, cfg, progress=False)
    es = hist["early_stopping"]
    values = [v[CFG.valid_metric] for v in es["valid"]]
    assert es["epochs_run"] == hist["chosen_epoch"] + 1 < CFG.epochs  # stopped at the first epoch without a gain
    assert values[-1] <= max(values[:-1])
    ref = _fixed(vectors, seqs, hist["chosen_epoch"])  # refit = a fixed run of the chosen count on everything
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_no_stop_before_min_steps(data):
    """Patience 1 stops a run right after its best epoch; with min_steps beyond that run's steps the
    same run goes on until the steps are reached, and its first epochs are the same epochs."""
    vectors, seqs = data
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 12, "patience": 1, "patience_ratio": 0.0})
    torch.manual_seed(0)
    short = train_model(build_model("gru", vectors), seqs, cfg, progress=False)
    ran = short["early_stopping"]["epochs_run"]
    assert ran < cfg.epochs and len(short["epoch_steps"]) == ran
    per_epoch = short["epoch_steps"][0]
    assert per_epoch > 0 and all(n == per_epoch for n in short["epoch_steps"])
    need = per_epoch * ran + 1  # one step more than the short run took: at least one more epoch
    torch.manual_seed(0)
    longer = train_model(build_model("gru", vectors), seqs, TrainConfig(**{**cfg.__dict__, "min_steps": need}),
                         progress=False)
    es = longer["early_stopping"]
    assert es["min_steps"] == need and es["epochs_run"] >= min(cfg.epochs, -(-need // per_epoch)) > ran
    if es["epochs_run"] < cfg.epochs:  # it stopped: both conditions held at its last epoch
        assert sum(longer["epoch_steps"]) >= need and es["epochs_run"] - longer["chosen_epoch"] >= cfg.patience
    # the same seed, the same epochs: the short run's curve is the start of the longer one
    assert [v["mrr"] for v in es["valid"][:ran]] == [v["mrr"] for v in short["early_stopping"]["valid"]]


@pytest.mark.parametrize("name", ["gru", "hiertcn"])
def test_validation_metric_is_the_evaluations(data, name):
    """Teacher-forced validation == the streaming protocol on (events before start, events after)."""
    vectors, seqs = data
    torch.manual_seed(0)
    model = build_model(name, vectors)
    train_model(model, seqs, TrainConfig(epochs=1), progress=False)
    split = split_validation(seqs, 0.2, 400, 0)
    assert 0 < split.targets < split.targets_total  # the cap keeps a subset
    got = Validator(model, split)(model).metrics
    train = {str(i): tuple(a[:s] for a in v) for i, (v, s) in enumerate(zip(split.valid, split.starts, strict=True))}
    test = {str(i): tuple(a[s:] for a in v) for i, (v, s) in enumerate(zip(split.valid, split.starts, strict=True))}
    ref = evaluate_model(model, train, test, progress=False)
    assert set(got) == {v for v in ref if "+" in v}  # every served variant
    for v, m in got.items():
        assert m["events_scored"] == ref[v]["events_scored"] == split.targets
        for k in ("recall@1", "recall@10"):
            assert m[k] == pytest.approx(ref[v][k], abs=1e-9), (v, k)
        # the two paths agree to float rounding (parity: 1e-6), which can flip a near-tie deep in the
        # list: one target's rank 800 -> 801 moves the MRR by ~4e-9 here; a rank in the top 30 moves it
        # by more than 1e-6
        assert m["mrr"] == pytest.approx(ref[v]["mrr"], abs=1e-6), v


def test_too_small_a_train_period_falls_back_to_fixed_epochs(data, caplog):
    vectors, seqs = data
    model = build_model("gru", vectors)
    with caplog.at_level(logging.INFO, logger="livemb.models.train"):
        hist = train_model(model, seqs, TrainConfig(epochs=2, valid_min_targets=10**9), progress=False)
    assert hist["chosen_epoch"] == 2 and len(hist["epoch_seconds"]) == 2
    assert not hist["early_stopping"]["used"]
    assert "early stopping off" in caplog.text and "fixed 2 epochs" in caplog.text


def test_weight_average_is_the_exponential_moving_average_of_the_steps():
    """avg <- d * avg + (1 - d) * p after each step, by hand for three steps of one parameter."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    avg = WeightAverage([p], 0.9)
    want = p.detach().clone()
    for value in ([3.0, 0.0], [5.0, 4.0], [-1.0, 1.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        avg.update()
        want = 0.9 * want + 0.1 * torch.tensor(value)
    with avg.swapped():
        assert torch.allclose(p, want)
    assert p.tolist() == [-1.0, 1.0]  # the trained weights are back after the swap
    avg.load()
    assert torch.allclose(p, want)


def test_the_choice_runs_on_vectors_from_before_the_held_out_tail(data):
    """vectors_before(cut) replaces the item vectors while the epoch and variant are chosen; the refit
    and so the checkpoint keep the model's own."""
    vectors, seqs = data
    seen = []
    other = np.random.default_rng(1).standard_normal(vectors.shape).astype(np.float32)

    def before(cut_ms: int) -> np.ndarray:
        seen.append(cut_ms)
        return other

    torch.manual_seed(0)
    model = build_model("gru", vectors)
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 2, "refit": True})
    hist = train_model(model, seqs, cfg, progress=False, vectors_before=before)
    split = split_validation(seqs, cfg.valid_fraction, cfg.valid_max_targets, cfg.seed)
    assert seen == [split.cut_ms] and hist["early_stopping"]["item_vectors"] == "rebuilt without the held-out tail"
    assert torch.equal(model.item_vecs, torch.as_tensor(vectors))
    torch.manual_seed(0)
    own = build_model("gru", vectors)
    own_hist = train_model(own, seqs, cfg, progress=False)
    assert own_hist["early_stopping"]["valid"] != hist["early_stopping"]["valid"]  # it chose on other vectors


def test_vectors_before_a_cut_know_only_the_items_seen_before_it():
    df, ids, _ = synth_ecommerce(users=60, items=300, days=20, seed=4)
    table = build_item_vectors(df, dim=16)
    cut = int(df["ts"].quantile(0.7))
    late_only = set(df.loc[df["ts"] >= cut, "item_id"]) - set(df.loc[df["ts"] < cut, "item_id"])
    vecs = vectors_before(df, table)(cut)
    assert vecs.shape == (len(table) + 1, table.dim) and not vecs[0].any()
    idx = table.lookup(np.array(sorted(late_only)))
    assert len(idx[idx > 0]) and not vecs[idx[idx > 0]].any()  # items first seen after the cut: zeros
    assert vecs.any(axis=1).sum() > len(table) // 2
    assert not np.allclose(vecs[1:], table.vectors)  # rebuilt, not the full-log vectors
