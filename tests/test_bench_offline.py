"""tools/bench/components.py on tiny sizes: the rows it returns are measured, complete and sane."""

import numpy as np

from livemb.tools.bench.components import bench_model, bench_retrieval, bench_state, main, structured_item_vectors


def test_structured_vectors_have_neighbourhoods_unlike_noise():
    x, q = structured_item_vectors(2000, 16, seed=3, n_queries=50)
    assert x.shape == (2000, 16) and q.shape == (50, 16) and x.dtype == q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    x2, q2 = structured_item_vectors(2000, 16, seed=3, n_queries=50)
    assert np.array_equal(x, x2) and np.array_equal(q, q2)  # deterministic by seed
    noise = np.random.default_rng(3).normal(size=(2000, 16))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)

    def nn_sim(v):  # mean inner product with the nearest other item
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        return s.max(1).mean()

    assert nn_sim(x) > nn_sim(noise) + 0.1
    # queries look like users: each is close to some item (a mixture of a few of them)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    assert (qn @ x.T).max(1).mean() > 0.8


def test_bench_retrieval_rows():
    rows = bench_retrieval((3000,), ("flat", "hnsw", "ivfpq"), dim=16, n_queries=64, batch=32, batch1_seconds=0.01)
    main_rows = {r["kind"]: r for r in rows if r["bench"] == "retrieval"}
    assert set(main_rows) == {"flat", "hnsw", "ivfpq"}
    assert main_rows["flat"]["recall@20"] == 1.0
    assert main_rows["hnsw"]["recall@20"] > 0.9
    assert 0.0 < main_rows["ivfpq"]["recall@20"] <= 1.0
    for r in main_rows.values():
        assert r["build_s"] >= 0 and r["index_bytes"] > 0 and r["qps_batch1"] > 0 and r["qps_batch32"] > 0
    # the compressed index is smaller than the vectors; the graph is larger
    assert main_rows["ivfpq"]["index_bytes"] < main_rows["flat"]["index_bytes"] < main_rows["hnsw"]["index_bytes"]
    sweep = [r for r in rows if r["bench"] == "retrieval_sweep" and r["kind"] == "hnsw"]
    assert [r["value"] for r in sweep] == [32, 64, 128, 256]
    assert sweep[-1]["recall@20"] >= sweep[0]["recall@20"]


def test_bench_model_rows():
    rows = bench_model(dim=8, hidden=16, n_items=200, batches=(1, 16), histories=(3, 120), history_batch=4,
                       seconds=0.01)
    batch = {r["batch"]: r for r in rows if r["bench"] == "model_batch"}
    assert set(batch) == {1, 16} and all(r["user_steps_per_s"] > 0 for r in batch.values())
    hist = {r["history"]: r for r in rows if r["bench"] == "model_history"}
    assert hist[3]["n_events_state"] == 3 and hist[120]["n_events_state"] == 120
    assert hist[120]["sessions_state"] == 12  # sessions of 10 events
    assert hist[3]["row_bytes"] == hist[120]["row_bytes"]  # fixed-size state
    assert all(r["us_per_event"] > 0 for r in hist.values())


def test_bench_state_writes_real_rocksdb(tmp_path):
    rows = bench_state(300, dim=8, hidden=16, events_per_user=20, n_items=100, partitions=2, chunk=128,
                       workdir=str(tmp_path))
    (r,) = rows
    assert r["users"] == 300 and r["row_bytes_per_user"] > r["record_bytes_per_user"] > 0
    # every row is on disk: at least the rows' bytes (compression of a float state saves little)
    assert r["rocksdb_sst_bytes"] > 0.3 * 300 * r["row_bytes_per_user"]
    assert r["rocksdb_bytes_per_100k_users"] == round(r["rocksdb_bytes"] * 100_000 / 300)
    assert list(tmp_path.iterdir()) == []  # the temp DBs are removed


def test_cli_refuses_bad_sizes(capsys):
    assert main(["--sizes", "ten"]) == 2
    assert "error" in capsys.readouterr().out
