"""Smoke tests per model on tiny data, losses, checkpoints, state size."""

import numpy as np
import pytest
import torch

from livemb.core.errors import ConfigError
from livemb.models import MODEL_REGISTRY, EventBatch, ModelConfig
from livemb.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from livemb.models.train import LOSSES, TrainConfig, batch_loss, train_model


def tiny_data(seed=0, users=12, N=30, D=8):
    rng = np.random.default_rng(seed)
    vecs = np.concatenate([np.zeros((1, D)), rng.normal(size=(N, D))]).astype(np.float32)
    seqs = []
    for _ in range(users):
        T = int(rng.integers(3, 25))
        ts = 1_700_000_000_000 + np.cumsum(rng.choice([20_000, 4_000_000], size=T, p=[0.8, 0.2]))
        seqs.append((rng.integers(1, N + 1, size=T), rng.integers(0, 5, size=T), ts))
    return vecs, seqs


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_model_trains_and_scores(name):
    vecs, seqs = tiny_data()
    model = MODEL_REGISTRY[name](ModelConfig(name=name, dim=8, hidden=16, channels=8), vecs)
    hist = train_model(model, seqs, TrainConfig(epochs=2, batch_size=4, negatives=8), progress=False)
    if model.trainable:
        assert len(hist["loss"]) == 2 and all(np.isfinite(hist["loss"]))
    ev = EventBatch.from_sequences(*zip(*seqs[:3], strict=True))
    with torch.no_grad():
        st, u = model.step(model.init_state(3), ev)
        s = model.scores(st, u)
    assert s.shape == (3, 31)
    assert torch.isfinite(s[:, 1:]).all() and torch.isneginf(s[:, 0]).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_decrease(loss):
    vecs, seqs = tiny_data(seed=1)
    torch.manual_seed(0)
    model = MODEL_REGISTRY["gru"](ModelConfig(name="gru", dim=8, hidden=16), vecs)
    ev = EventBatch.from_sequences(*zip(*seqs, strict=True))
    cfg = TrainConfig(loss=loss, negatives=8)
    gen = torch.Generator().manual_seed(0)
    before = batch_loss(model, ev, cfg, gen)[0].item()
    train_model(model, seqs, TrainConfig(epochs=15, batch_size=12, loss=loss, negatives=8, lr=1e-2), progress=False)
    after = batch_loss(model, ev, cfg, torch.Generator().manual_seed(0))[0].item()
    assert after < before


def test_unknown_loss_is_refused():
    vecs, seqs = tiny_data()
    model = MODEL_REGISTRY["gru"](ModelConfig(name="gru", dim=8), vecs)
    with pytest.raises(ConfigError, match="unknown loss"):
        train_model(model, seqs, TrainConfig(loss="mse"), progress=False)


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    vecs, seqs = tiny_data()
    model = MODEL_REGISTRY["hiertcn"](ModelConfig(name="hiertcn", dim=8, hidden=16, channels=8), vecs)
    train_model(model, seqs, TrainConfig(epochs=1, batch_size=4, negatives=8), progress=False)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "abc123")
    again = load_checkpoint(path, vecs, "abc123")
    assert again.cfg == model.cfg
    ev = EventBatch.from_sequences(*zip(*seqs[:2], strict=True))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ev), again(ev))
    with pytest.raises(CheckpointError, match="item table"):
        load_checkpoint(path, vecs, "other")
    with pytest.raises(CheckpointError, match=r"trained on 8-d item vectors, but the given item vectors have shape \(\d+, 4\).*trained with$"):
        load_checkpoint(path, vecs[:, :4], "abc123")
    (tmp_path / "m.items.npz").write_bytes(b"")  # `livemb train` saves the items it built beside the checkpoint
    with pytest.raises(CheckpointError, match=r"m\.items\.npz, saved beside it"):
        load_checkpoint(path, vecs[:, :4], "abc123", allow_new_items=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a livemb checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", vecs, "abc123")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", vecs, "abc123")
    old = torch.load(path, weights_only=True)
    old["format"] = 1  # a checkpoint from before the repeat mixture / compact memory
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 1.*retrain"):
        load_checkpoint(tmp_path / "old.pt", vecs, "abc123")


def test_nan_loss_is_refused():
    vecs, seqs = tiny_data()
    vecs[1:] = np.nan
    model = MODEL_REGISTRY["gru"](ModelConfig(name="gru", dim=8), vecs)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train_model(model, seqs, TrainConfig(epochs=1, batch_size=4), progress=False)


@pytest.mark.parametrize("name", ["hiertcn", "hiergru", "hgru", "hrnn", "gru", "tcn"])
def test_state_fits_budget(name):
    """SPEC section 6: <= 4 KiB per user at D=64, H=128 (model tensors + repeat memory), with what
    the worker adds: the open catalogue's new-item pool and the last published list."""
    vecs = np.zeros((11, 64), np.float32)
    model = MODEL_REGISTRY[name](ModelConfig(name=name, dim=64, hidden=128), vecs)
    from livemb.models.newitems import with_pool
    from livemb.state.guard import GuardState, wrap
    from livemb.state.record import encode
    from livemb.stream.quality import REC_LEN, with_rec

    st = with_rec(with_pool(model.init_state(1)), 1)
    assert st["rec_item"].shape == (1, REC_LEN)
    record = encode({k: v[0].numpy() for k, v in st.items()}, {"items": 1})
    row = wrap(GuardState(size=16), record)  # what the RocksDB table stores for one user
    assert len(row) <= 4096, f"{name}: {len(row)} bytes per user"


def test_session_runs_of_a_flat_layout():
    """Two users, T = 5: user 0 has sessions [0, 1] [2, 3, 4], user 1 has [0] [1, 2] and a pad."""
    from livemb.models.layers import session_layout, session_runs

    new_session = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    sess, _, S, _ = session_layout(new_session, mask)
    idx, keep, lengths, owner = session_runs(sess, mask, S)
    assert S == 2 and owner.tolist() == [0, 1, 2, 3]  # b * S + session
    assert lengths.tolist() == [2, 3, 1, 2]
    assert idx[keep].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # every real event once, flat b * T + t
    assert keep.sum(1).tolist() == lengths.tolist() and int(idx[~keep].max()) == 0


def test_per_event_gathers_each_events_session_row_and_its_gradient():
    """x (B=2, S=2, F=1) = [[10, 20], [30, 40]]; events of user 0 in sessions 0 0 1, user 1 in 1 1 0."""
    from livemb.models.layers import per_event

    x = torch.tensor([[[10.0], [20.0]], [[30.0], [40.0]]], requires_grad=True)
    segment = torch.tensor([[0, 0, 1], [1, 1, 0]])
    out = per_event(x, segment)
    assert out.shape == (2, 3, 1)
    assert out[..., 0].tolist() == [[10, 10, 20], [40, 40, 30]]
    out.sum().backward()
    assert x.grad[..., 0].tolist() == [[2, 1], [1, 2]]  # how many events read each session
