"""faiss explore hits merged with the repeat path; exclude_seen; approximate indexes vs exact."""

import numpy as np
import pytest
import torch

from livemb.core.errors import ConfigError
from livemb.models import MODEL_REGISTRY, EventBatch, ModelConfig, retrieval
from livemb.models.retrieval import Retriever, block_topk, build_index, recall_at_k, recall_vs_exact


def setup(exclude="none", topk=5, name="mv"):
    rng = np.random.default_rng(0)
    D, N = 8, 50
    vecs = np.concatenate([np.zeros((1, D)), rng.normal(size=(N, D))]).astype(np.float32)
    torch.manual_seed(0)
    # mv: the fixed rule; gru: the learned mixture (untrained weights, still a full scoring path)
    model = MODEL_REGISTRY[name](ModelConfig(name=name, dim=D, hidden=8), vecs).eval()
    ev = EventBatch.from_sequences([np.array([3, 7, 3])], [np.zeros(3, np.int64)],
                                   [np.array([0, 10_000, 20_000])])
    st, u = model.step(model.init_state(1), ev)
    return model, vecs, st, u, Retriever(vecs, "flat", topk, exclude)


@pytest.mark.parametrize("name", ["mv", "gru"])
def test_merge_equals_full_catalogue_ranking(name):
    """live == offline: faiss hits merged with the memory give the evaluation's full ranking."""
    model, vecs, st, u, r = setup(name=name)
    items, scores = r.candidates(model, st, u)
    with torch.no_grad():
        full = model.scores(st, u)[0]
    want = torch.topk(full, 5).indices.numpy()
    assert items[0].tolist() == want.tolist()
    if name == "mv":
        assert set(items[0, :2].tolist()) == {3, 7}  # the fixed rule: memory items first
    assert len(set(items[0].tolist())) == 5
    np.testing.assert_allclose(scores[0], full[want].numpy(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["session", "history"])
def test_exclude_seen_removes_memory_items(mode):
    model, vecs, st, u, r = setup(mode)
    items, _ = r.candidates(model, st, u)
    assert not ({3, 7} & set(items[0].tolist()))


@pytest.mark.parametrize(("B", "nb", "k"), [(1, 1, 5), (3, 2, 20), (7, 40, 20), (5, 10, 84), (2, 300, 3)])
def test_block_topk_gives_torch_topk_values(B, nb, k):
    s = torch.randn(B, nb * 16, generator=torch.Generator().manual_seed(nb))
    s[0, :5] = float("-inf")  # masked entries, as the flat search makes them
    k = min(k, s.shape[1])
    vals, idx = block_topk(s, k, 16)
    want = s.topk(k, dim=1)
    assert torch.equal(vals, want.values)
    assert torch.equal(s.gather(1, idx), vals)  # the indices point at those values
    assert all(len(set(row.tolist())) == k for row in idx)


def test_flat_search_is_exact_across_user_chunks(monkeypatch):
    """Hits outside each user's memory and the exact log Z over every item, equal to a dense
    reference, when the users are split over several chunks of the score buffer."""
    rng = np.random.default_rng(3)
    D, N, B, M = 8, 997, 9, 6  # N + 1 not a multiple of the block: padded columns must never win
    vecs = np.concatenate([np.zeros((1, D)), rng.normal(size=(N, D))]).astype(np.float32)
    model = MODEL_REGISTRY["gru"](ModelConfig(name="gru", dim=D, hidden=8), vecs).eval()
    u = torch.from_numpy(rng.normal(size=(B, D)).astype(np.float32))
    mem = torch.from_numpy(rng.integers(1, N + 1, size=(B, M)))
    mem[0, 3:] = 0  # empty slots
    mem[1, 1] = mem[1, 0]  # a repeated item
    monkeypatch.setattr(retrieval, "SCORE_BUFFER_FLOATS", 4 * 1024)  # 4 users per chunk
    r = Retriever(vecs, "flat", topk=10)
    top_s, top_i, logz = r.flat_search(model, u, mem, want_logz=True)
    dense = u @ torch.from_numpy(vecs[1:]).T  # (B, N), column j = item j + 1
    torch.testing.assert_close(logz, torch.logsumexp(dense, dim=1))
    masked = dense.scatter(1, (mem - 1).clamp(min=0), float("-inf"))
    masked[0, :] = dense[0, :]
    masked[0].scatter_(0, mem[0, :3] - 1, float("-inf"))  # row 0: only its three filled slots
    want = masked.topk(10, dim=1)
    torch.testing.assert_close(top_s, want.values)
    assert torch.equal(top_i, want.indices + 1)
    assert not (top_i[:, :, None] == mem[:, None, :]).any()


@pytest.mark.parametrize("scale", [1.0, 300.0, -300.0])
def test_flat_log_z_is_exact_whatever_the_score_range(scale):
    """log Z over float32 scores that exp alone would overflow (above ~88) or underflow (below
    ~-103) is still finite and exact: the sum is shifted by each row's max."""
    rng = np.random.default_rng(4)
    D, N, B = 8, 500, 4
    vecs = rng.normal(size=(N, D)).astype(np.float32)
    vecs[:, 0] = 1.0 + np.abs(vecs[:, 0])  # every item's first coordinate > 1: u = (-c, 0, ...) scores all < -c
    vecs = np.concatenate([np.zeros((1, D), np.float32), vecs])
    model = MODEL_REGISTRY["gru"](ModelConfig(name="gru", dim=D, hidden=8), vecs).eval()
    u = torch.from_numpy(rng.normal(size=(B, D)).astype(np.float32))
    u[1] = 0.0
    u[1, 0] = 1.0
    u[1] *= scale  # 1: moderate; 300: max ~ +600 (overflow unshifted); -300: every score < -300 (underflow)
    r = Retriever(vecs, "flat", topk=5)
    _, _, logz = r.flat_search(model, u, torch.zeros(B, 3, dtype=torch.long), want_logz=True)
    want = torch.logsumexp((u.double() @ torch.from_numpy(vecs[1:]).double().T), dim=1).float()
    assert torch.isfinite(logz).all()
    torch.testing.assert_close(logz, want, rtol=1e-6, atol=1e-5)


def test_approximate_indexes_report_recall():
    rng = np.random.default_rng(1)
    vecs = np.concatenate([np.zeros((1, 16)), rng.normal(size=(2000, 16))]).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    assert recall_vs_exact(vecs, "hnsw", q, 10) > 0.9
    assert 0.0 < recall_vs_exact(vecs, "ivfpq", q, 10) <= 1.0
    with pytest.raises(ConfigError, match="index must be"):
        Retriever(vecs, "lsh")


# ---------------------------------------------------------------- prebuilt index files (livemb index)
def items_file(tmp_path, seed=0, N=300, D=8, name="items.npz"):
    from livemb.core.items import ItemTable

    rng = np.random.default_rng(seed)
    table = ItemTable(np.array([f"i{k}" for k in range(N)]), rng.normal(size=(N, D)).astype(np.float32))
    return table, table.save(tmp_path / name)


def test_index_file_roundtrip_and_refusals(tmp_path):
    from livemb.models.retrieval import IndexFileError, build_index_file, load_index

    table, items = items_file(tmp_path)
    out = tmp_path / "idx" / "items.hnsw"
    meta = build_index_file(items, "hnsw", out, {"efSearch": 40}, progress=False)
    assert meta["items_fingerprint"] == table.fingerprint and meta["kind"] == "hnsw"
    assert meta["params"]["efSearch"] == 40 and meta["n_items"] == len(table)
    kw = dict(items_fingerprint=table.fingerprint, n_items=len(table), dim=table.dim)
    idx = load_index(out, kind="hnsw", **kw)
    assert idx.hnsw.efSearch == 40  # search-time parameters come back from the sidecar
    q = table.vectors[:20]
    exact = build_index(table.padded_vectors(), "flat").search(q, 5)[1]
    assert recall_at_k(idx.search(q, 5)[1], exact) > 0.9  # the loaded index serves these items
    with pytest.raises(IndexFileError, match="is a hnsw index, the worker is set to --index flat"):
        load_index(out, kind="flat", **kw)
    with pytest.raises(IndexFileError, match="was built for items .* rebuild it with `livemb index"):
        load_index(out, kind="hnsw", **{**kw, "items_fingerprint": "0123456789abcdef"})
    with pytest.raises(IndexFileError, match="not found"):
        load_index(tmp_path / "none", kind="hnsw", **kw)
    (tmp_path / "idx" / "items.hnsw.json").unlink()
    with pytest.raises(IndexFileError, match="no sidecar"):
        load_index(out, kind="hnsw", **kw)
    with pytest.raises(ConfigError, match="has no parameter"):
        build_index_file(items, "hnsw", out, {"nprobe": 3}, progress=False)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_every_kind_loads_memory_mapped(tmp_path, kind):
    from livemb.models.retrieval import build_index_file, load_index

    table, items = items_file(tmp_path, N=600)
    build_index_file(items, kind, tmp_path / "idx", progress=False)
    idx = load_index(tmp_path / "idx", items_fingerprint=table.fingerprint, kind=kind, n_items=len(table), dim=table.dim)
    q = table.vectors[:20]
    exact = build_index(table.padded_vectors(), "flat").search(q, 5)[1]
    assert recall_at_k(idx.search(q, 5)[1], exact) >= (1.0 if kind == "flat" else 0.8)


def test_livemb_index_command(tmp_path, capsys):
    from livemb.tools.cli import main

    table, items = items_file(tmp_path)
    out = tmp_path / "items.ivfpq"
    assert main(["index", "--items", str(items), "--index", "ivfpq", "--param", "nprobe=4", "--out", str(out)]) == 0
    assert f"ivfpq over {len(table)} x {table.dim} items {table.fingerprint}" in capsys.readouterr().out
    assert out.is_file() and (tmp_path / "items.ivfpq.json").is_file()
    assert main(["index", "--items", str(items), "--param", "nprobe", "--out", str(out)]) == 2
    assert "expected NAME=INTEGER" in capsys.readouterr().err


def served(tmp_path):
    from livemb.models.checkpoint import save_checkpoint

    table, items = items_file(tmp_path)
    model = MODEL_REGISTRY["mv"](ModelConfig(name="mv", dim=table.dim, hidden=8), table.padded_vectors())
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, table.fingerprint)
    return table, items, ckpt


def test_serving_loads_a_prebuilt_index_and_refuses_a_stale_one(tmp_path):
    from livemb.models.retrieval import IndexFileError, build_index_file
    from livemb.models.serving import Serving

    table, items, ckpt = served(tmp_path)
    idx = tmp_path / "items.hnsw"
    build_index_file(items, "hnsw", idx, progress=False)
    sv = Serving.load(str(ckpt), str(items), index="hnsw", index_path=str(idx))
    assert sv.retriever.index.ntotal == len(table) and sv.retriever.kind == "hnsw"
    other, other_items = items_file(tmp_path, seed=1, name="other.npz")
    build_index_file(other_items, "hnsw", idx, progress=False)  # now built for other items
    with pytest.raises(IndexFileError, match="was built for items"):
        Serving.load(str(ckpt), str(items), index="hnsw", index_path=str(idx))
    sv = Serving.load(str(ckpt), str(items), index="hnsw", index_path=str(idx), stale_index="rebuild")
    assert sv.retriever.index.ntotal == len(table)  # rebuilt for the served items


def test_worker_refuses_a_stale_index_at_start_and_rebuilds_on_hot_swap(tmp_path, caplog):
    import os

    from livemb.core.items import ItemTable
    from livemb.core.settings import Settings
    from livemb.models.retrieval import IndexFileError, build_index_file
    from livemb.stream.processor import ModelProcessor

    table, items, ckpt = served(tmp_path)
    idx = tmp_path / "items.hnsw"
    build_index_file(items, "hnsw", idx, progress=False)
    s = Settings(model_path=str(ckpt), items_path=str(items), index="hnsw", index_path=str(idx))
    proc = ModelProcessor(s, reload_check_s=0.0)
    assert proc.serving.retriever.index.ntotal == len(table)
    with pytest.raises(IndexFileError, match="is a hnsw index, the worker is set to --index flat"):
        ModelProcessor(Settings(model_path=str(ckpt), items_path=str(items), index_path=str(idx)))
    # new item vectors (same ids) swapped in while the index file still describes the old ones
    new = ItemTable(table.ids, table.vectors[::-1].copy())
    new.save(items)
    st = os.stat(items)
    os.utime(items, (st.st_atime, st.st_mtime + 5))
    with caplog.at_level("WARNING", logger="livemb.serving"):
        assert proc.maybe_reload()
    assert proc.serving.table.fingerprint == new.fingerprint
    assert proc.serving.retriever.index.ntotal == len(new)
    assert "was built for items" in caplog.text and "building a hnsw index" in caplog.text


def test_worker_cli_refuses_a_stale_index_in_one_line(tmp_path, capsys):
    from livemb.models.retrieval import build_index_file
    from livemb.tools.cli import main

    _, items, ckpt = served(tmp_path)
    _, other_items = items_file(tmp_path, seed=1, name="other.npz")
    idx = tmp_path / "other.hnsw"
    build_index_file(other_items, "hnsw", idx, progress=False)
    rc = main(["worker", "--model", str(ckpt), "--items", str(items), "--index", "hnsw", "--index-path", str(idx),
               "--data-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "was built for items" in err and "Traceback" not in err


def test_estimated_logz_behind_an_approximate_index_is_close_to_exact() -> None:
    """Head = the index's hits, tail = a fixed uniform sample: checked against the exact log Z."""
    from livemb.models.retrieval import _logz_sample, estimate_logz

    g = torch.Generator().manual_seed(0)
    N, D, B = 50_000, 32, 64
    V = torch.nn.functional.normalize(torch.randn(N + 1, D, generator=g) @ torch.randn(D, D, generator=g), dim=1) * 3
    u = V[torch.randint(1, N + 1, (B,), generator=g)] + 0.1 * torch.randn(B, D, generator=g)
    s = u @ V[1:].T
    exact = torch.logsumexp(s, 1)
    est = estimate_logz(s.topk(84, 1).values, u @ V[_logz_sample(N, u.device)].T, N)
    err = (est - exact).abs()
    assert err.mean() < 0.15 and err.max() < 1.0, (err.mean(), err.max())  # measured 0.11 / 0.37
    # the tail matters: the hits alone miss most of Z
    assert (exact - torch.logsumexp(s.topk(84, 1).values, 1)).mean() > 1.0
