"""HierTCN against its rivals on a synthetic log whose structure is known (tools/data/synth.py).

The log plants both levels the hierarchy is built for: a long-term taste that decides which topic
the next session is about (never the previous session's), and an in-session walk whose order a
sequence model can learn. The protocol is `livemb evaluate`'s (tools/evaluate.run_evaluation) with
the default loss. HierTCN at the service default (repeat path on, nothing masked) must beat every
rival's best variant (repeat on/off x exclude_seen none/session/history), so a baseline is not
beaten only through a badly tuned repeat rule.
"""

from __future__ import annotations

import pytest
import torch

from livemb.core.items import ItemTable
from livemb.models.evaluation import DEFAULT_VARIANT
from livemb.models.train import TrainConfig
from livemb.tools.data.synth import synth_log
from livemb.tools.offline.evaluate import run_evaluation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results() -> dict:
    torch.manual_seed(0)
    df, ids, vectors = synth_log(users=300, items=400, days=14, seed=0, topics=10, dim=32)
    cfg = TrainConfig(epochs=30, batch_size=16, seed=0)  # loss: the default (hinge)
    out = run_evaluation(df, ItemTable(ids, vectors), ["mv", "last", "gru", "hiertcn"], cfg, progress=False)
    return out["results"]


def best_variant_recall(res: dict) -> float:
    return max(v["recall@10"] for v in res["variants"].values())


@pytest.mark.parametrize("rival", ["mv", "last", "gru"])
def test_hiertcn_beats_rival_on_recall_at_10(results, rival):
    ours = results["hiertcn"]["variants"][DEFAULT_VARIANT]["recall@10"]
    theirs = best_variant_recall(results[rival])
    # measured here: hiertcn 0.413; gru 0.391, last 0.387 (norep+session), mv 0.213. Through the
    # CLI (another model init) gru reached 0.399: the in-session gap to the flat GRU is small
    # (0.014-0.022, ~2-3 standard errors over 5,230 targets), hence a margin of 0.01.
    assert ours >= theirs + 0.01, (rival, ours, theirs)


def test_hierarchy_earns_its_keep_at_session_starts(results):
    # The flat GRU cannot know a new session is starting, nor carry the taste across sessions as
    # cleanly: this is where the long-term GRU and the session-start embedding must show
    # (measured: hiertcn 0.252 vs gru 0.154 here, 0.159 through the CLI; last 0.260. Later, with
    # the mixture as the default: hiertcn 0.236 (main before issue 8's third pass) and 0.226 (after
    # it: the fused training path changes float rounding only, and 30 epochs amplify it), gru
    # 0.10, last 0.247. One standard error over these 623 targets is ~0.017.)
    ours = results["hiertcn"]["session_start"]["recall@10"]
    assert ours >= results["gru"]["session_start"]["recall@10"] + 0.05
    assert ours >= results["last"]["session_start"]["recall@10"] - 0.03  # and no worse than last (~1.8 SE)
