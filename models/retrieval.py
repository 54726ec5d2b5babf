"""Top-K candidates: faiss over the catalogue (explore path) merged with the user's recent items.

One faiss search per batch of users (never one per user), then a vectorized merge:

    explore hits    (B, k+M)  <u, x_i> from faiss
    repeat entries  (B, M)    the repeat path's score of the user's memory items, and a shift
                              for the explore hits (SeqModel.memory_scores: mixture or rule)
    merged          top-K over both, a memory item's faiss hit dropped in favour of its entry
    exclude_seen    none | session | history removes memory items (as in evaluation)

The live worker and `livemb embed` both call `Retriever.candidates`, so their outputs agree.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from core.settings import EXCLUDE_SEEN, INDEX_KINDS
from models import repeat
from models.base import SeqModel


def build_index(vectors: np.ndarray, kind: str = "flat", seed: int = 0) -> faiss.Index:
    """Inner-product index over item rows 1..N (faiss id i-1 -> item index i)."""
    x = np.ascontiguousarray(vectors[1:], dtype=np.float32)
    N, D = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(D)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    elif kind == "ivfpq":
        nlist = max(1, min(4096, int(np.sqrt(N))))
        m = next(m for m in (16, 8, 4, 2, 1) if D % m == 0)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        train = x if N <= 100_000 else x[np.random.default_rng(seed).choice(N, 100_000, replace=False)]
        index.train(train)
        index.nprobe = min(nlist, 16)
    else:
        raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    index.add(x)
    return index


class Retriever:
    def __init__(self, vectors: np.ndarray, kind: str = "flat", topk: int = 20, exclude_seen: str = "none"):
        if exclude_seen not in EXCLUDE_SEEN:
            raise ValueError(f"exclude_seen must be one of {', '.join(EXCLUDE_SEEN)}, got {exclude_seen!r}")
        self.kind, self.topk, self.exclude_seen = kind, topk, exclude_seen
        self.n_items = vectors.shape[0] - 1
        self.index = build_index(vectors, kind)

    def estimated_logz(self, model: SeqModel, u: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """The mixture's log Z behind an approximate index: scanning the catalogue for the exact Z
        would cost what the index saves (1M items: 64 MFLOP per user). Live and `livemb embed`
        share it; the evaluation ranks the full catalogue with the exact Z (docs/MODELS.md)."""
        sample = getattr(self, "_z_sample", None)
        if sample is None or sample.device != u.device:
            sample = self._z_sample = _logz_sample(self.n_items, u.device)
        with torch.no_grad():
            s = u.float() @ model.item_vecs[sample].float().T  # (B, S)
        return estimate_logz(top.float(), s, self.n_items)

    def candidates(self, model: SeqModel, state: dict[str, torch.Tensor], u: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, K) item indices (1-based, 0 = no candidate) and scores, best first."""
        M = state["mem_item"].shape[1]
        k = min(self.topk + M, self.n_items)
        logz = None
        if self.kind == "flat":
            # Exact search as ONE pass over the catalogue that also gives the mixture's log Z
            # (faiss + a second pass for log Z cost twice the scan), on the model's device.
            with torch.no_grad():
                s = u.float() @ model.item_vecs[1:].float().T  # (B, N)
                f_scores, f_idx = s.topk(k, dim=1)
                if model.repeat_mode == "mixture":
                    logz = torch.logsumexp(s, dim=1)
            f_items, f_scores = (f_idx + 1).cpu(), f_scores.cpu()  # 1-based
        else:
            q = np.ascontiguousarray(u.detach().float().cpu().numpy())
            f_scores, f_ids = self.index.search(q, k)  # (B, k), ids 0-based, -1 when missing
            f_items = torch.from_numpy(f_ids + 1)  # 1-based; 0 = missing
            f_scores = torch.from_numpy(f_scores)
            if model.repeat_mode == "mixture":
                logz = self.estimated_logz(model, u, f_scores.to(u.device).masked_fill(f_items.to(u.device) == 0, -np.inf))

        mem_item = state["mem_item"].long().cpu()
        with torch.no_grad():  # the one explore+repeat score (models.base.SeqModel.memory_scores)
            shift, m_scores = model.memory_scores(state, u, logz=logz)
        f_scores = f_scores + shift.float().cpu()[:, None]
        m_scores = m_scores.float().cpu().masked_fill(mem_item == 0, -np.inf)
        # drop faiss hits that the memory already scores (with the repeat bonus)
        dup = (f_items[:, :, None] == mem_item[:, None, :]).any(-1) | (f_items == 0)
        f_scores = f_scores.masked_fill(dup, -np.inf)
        seen_fields = ("mem_item", "mem_sess", "session")
        excluded = repeat.seen_mask({k: state[k].cpu() for k in seen_fields}, self.n_items + 1, self.exclude_seen)
        if excluded is not None:
            f_scores = f_scores.masked_fill(excluded.gather(1, f_items), -np.inf)
            m_scores = m_scores.masked_fill(excluded.gather(1, mem_item), -np.inf)
        items = torch.cat([f_items, mem_item], dim=1)
        scores = torch.cat([f_scores, m_scores], dim=1)
        K = min(self.topk, scores.shape[1])
        top_scores, pos = scores.topk(K, dim=1)
        top_items = items.gather(1, pos).masked_fill(~torch.isfinite(top_scores), 0)
        return top_items.numpy(), top_scores.numpy()


Z_SAMPLE = 4096  # items of the log-Z estimate behind an approximate index (a fixed uniform sample)


def _logz_sample(n_items: int, device: torch.device) -> torch.Tensor:
    rng = np.random.default_rng(0)
    idx = rng.choice(n_items, size=min(Z_SAMPLE, n_items), replace=False) + 1  # 1-based item indices
    return torch.from_numpy(np.sort(idx)).to(device)


def estimate_logz(top: torch.Tensor, sample: torch.Tensor, n_items: int) -> torch.Tensor:
    """log Z ~ logsumexp(top hits, log((N - k) / S) + logsumexp(uniform sample of S items)).

    The head of the softmax is what the index found, the tail a uniform sample scaled to the items
    not in the head (a sampled item that is also a hit is counted twice: at most k/N of the tail).
    (B, k) and (B, S) -> (B,).
    """
    k, S = top.shape[1], sample.shape[1]
    tail = torch.logsumexp(sample, dim=1) + float(np.log(max(n_items - k, 1) / S))
    return torch.logaddexp(torch.logsumexp(top, dim=1), tail)


def recall_vs_exact(vectors: np.ndarray, kind: str, queries: np.ndarray, k: int = 20) -> float:
    """Recall@k of an approximate index against exact search (reported by the benchmark)."""
    exact = build_index(vectors, "flat").search(queries, k)[1]
    approx = build_index(vectors, kind).search(queries, k)[1]
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size
