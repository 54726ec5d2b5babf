"""Top-K candidates: faiss over the catalogue (explore path) merged with the user's recent items.

One search per batch of users (never one per user), then a vectorized merge:

    explore hits    (B, k+M)  <u, x_i> from faiss (hnsw, ivfpq); flat: (B, k) exact hits outside
                              the memory, from one torch pass that also gives the exact log Z
    repeat entries  (B, M)    the repeat path's score of the user's memory items, and a shift
                              for the explore hits (SeqModel.memory_scores: mixture or rule)
    merged          top-K over both, a memory item's faiss hit dropped in favour of its entry
    exclude_seen    none | session | history removes memory items (as in evaluation)

The live worker and `livemb embed` both call `Retriever.candidates`, so their outputs agree.

Big catalogues: an approximate index (hnsw, ivfpq) can be built ahead of time (`livemb index`,
`build_index_file`) and loaded at start (`load_index`, memory-mapped); a sidecar JSON next to the
index file names the item table it was built from (`ItemTable.fingerprint`), its kind and its
parameters, and a mismatch is refused with one line instead of serving another catalogue's ids.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from livemb.core.choices import EXCLUDE_SEEN, INDEX_KINDS
from livemb.core.errors import ConfigError, DataError
from livemb.core.items import ItemTable
from livemb.core.progress import progress as progress_bar
from livemb.models import newitems, repeat
from livemb.models.base import SeqModel
from livemb.models.newvectors import Extension

log = logging.getLogger("livemb.retrieval")

# Defaults tuned on 1M structured unit-norm 64-d items, 1 thread (`python -m livemb.tools.bench.components
# --tune`; figures in docs/BENCHMARKS.md "Offline components"). recall@20 vs exact at 1M:
#   HNSW M=32: efConstruction 40 -> 0.922, 80 -> 0.962, 160 -> 0.979 (efSearch 128); M=16 0.936,
#   M=48 0.957 (efConstruction 80). efConstruction is what buys recall here, and it is paid once,
#   ahead of time (`livemb index`: 159-182 s at 1M on one core). efSearch 64 gives 0.962 at ~1.8x the
#   queries/s of 128 (0.979): 128 keeps a margin over 0.95 for catalogues less regular than the
#   benchmark's, and is above k + M = 84, the hits the worker asks for (faiss uses max(efSearch, k)).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 160
HNSW_EF_SEARCH = 128
# IVF-PQ: nlist = sqrt(N) lists (capped at 4096) and 8-bit PQ codes of D/2 sub-vectors (32 bytes
# per item at D=64) give a shortlist whose recall@20 alone is PQ-bound (1M: 0.76 with D/2, 0.40
# with D/4 sub-vectors, whatever nprobe). The top refine*k of it are re-ranked on fp16 copies of
# the vectors (IndexRefine, 128 more bytes per item; 0.66x the Flat index): refine 8 -> 0.995 at
# nprobe 32, 0.992 at nprobe 8 (3x the queries/s). refine=0 keeps the pure PQ index (smallest).
IVF_NPROBE = 8
IVF_REFINE = 8
IVF_TRAIN_MAX = 100_000  # k-means training sample (faiss warns below ~39 points per list)
ADD_CHUNK = 50_000  # rows per index.add call (progress bar between calls)


# read_index flag that maps the file instead of copying it onto the heap. Measured with faiss 1.15
# on the 1M-item files (RssAnon after load): IO_FLAG_MMAP still copies (flat +244 MB, hnsw +504 MB,
# ivfpq +123 MB); IO_FLAG_MMAP_IFC maps flat and ivfpq entirely (+0-1 MB) and hnsw but for its
# 12 MB of levels and offsets, with the same search results. Pages come from the page cache, shared by the
# workers of one host. save_index replaces files by rename, so a mapped file is never rewritten.
MMAP_FLAG = faiss.IO_FLAG_MMAP_IFC


class IndexFileError(DataError):
    """A prebuilt index file that does not fit the served items (or cannot be read)."""


def index_params(kind: str, n_items: int, dim: int, overrides: dict | None = None) -> dict:
    """The parameters `build_index` uses for `kind` over n_items x dim (defaults above + overrides)."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind == "flat":
        p: dict = {}
    elif kind == "hnsw":
        p = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    else:
        p = {"nlist": max(1, min(4096, int(np.sqrt(n_items)))),
             "m": next(m for m in (dim // 2, 16, 8, 4, 2, 1) if m >= 1 and dim % m == 0), "nbits": 8,
             "nprobe": IVF_NPROBE, "refine": IVF_REFINE}
    unknown = set(overrides or {}) - set(p)
    if unknown:
        raise ConfigError(f"index {kind} has no parameter(s) {sorted(unknown)}; it takes {sorted(p) or 'none'}")
    p.update(overrides or {})
    if kind == "ivfpq":
        p["nlist"] = max(1, min(int(p["nlist"]), n_items))
        p["nprobe"] = min(int(p["nprobe"]), p["nlist"])
        if int(p["refine"]) < 0:
            raise ConfigError(f"ivfpq: refine={p['refine']} must be >= 0 (0: no re-ranking)")
        if dim % p["m"]:
            raise ConfigError(f"ivfpq: m={p['m']} must divide the item dim {dim}")
    return p


def set_search_params(index: faiss.Index, kind: str, params: dict) -> None:
    """Search-time parameters (not all of them survive faiss serialization: set after loading)."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])
    elif kind == "ivfpq":
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = float(params["refine"])
            faiss.extract_index_ivf(index.base_index).nprobe = int(params["nprobe"])
        else:
            index.nprobe = int(params["nprobe"])


def build_index(vectors: np.ndarray, kind: str = "flat", seed: int = 0, *, params: dict | None = None,
                progress: bool = False) -> faiss.Index:
    """Inner-product index over item rows 1..N (faiss id i-1 -> item index i). `params` override
    the tuned defaults (`index_params`); `progress` shows a bar while rows are added."""
    x = np.ascontiguousarray(vectors[1:], dtype=np.float32)
    N, D = x.shape
    p = index_params(kind, N, D, params)
    if kind == "flat":
        index = faiss.IndexFlatIP(D)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(D, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["efConstruction"])
    else:
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, p["nlist"], int(p["m"]), int(p["nbits"]),
                               faiss.METRIC_INNER_PRODUCT)
        ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1  # small tables: no warning per sub-quantizer
        index = ivf
        if p["refine"]:
            fp16 = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexRefine(ivf, fp16)  # keeps Python references to both (faiss add_ref_in_constructor)
        n_train = min(N, max(IVF_TRAIN_MAX, 39 * p["nlist"]))
        index.train(x if n_train == N else x[np.random.default_rng(seed).choice(N, n_train, replace=False)])
    set_search_params(index, kind, p)
    with progress_bar(total=N, desc=f"index {kind}", unit="items", disable=not progress) as bar:
        for i in range(0, N, ADD_CHUNK):
            index.add(x[i : i + ADD_CHUNK])
            bar.update(min(ADD_CHUNK, N - i))
    return index


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_index(index: faiss.Index, path: str | Path, *, items_fingerprint: str, kind: str, params: dict,
               build_seconds: float | None = None) -> Path:
    """Write the faiss index and its sidecar (`<path>.json`), each through a temp file + rename.
    The two renames are not one atomic step: build the index for new items before swapping the
    items file in (the worker rebuilds, with a warning, when they do not match)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    meta = {"format": 1, "items_fingerprint": items_fingerprint, "kind": kind, "params": params,
            "n_items": int(index.ntotal), "dim": int(index.d), "faiss": faiss.__version__,
            "build_seconds": build_seconds}
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    return path


def read_sidecar(path: str | Path) -> dict:
    side = sidecar_path(path)
    if not Path(path).is_file():
        raise IndexFileError(f"index file {path} not found (build it with `livemb index`)")
    try:
        meta = json.loads(side.read_text())
        meta["items_fingerprint"], meta["kind"], meta["params"]  # noqa: B018 - required keys
    except FileNotFoundError:
        raise IndexFileError(f"index file {path} has no sidecar {side} (build it with `livemb index`)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFileError(f"index sidecar {side} is unreadable: {e!r}") from None
    return meta


def load_index(path: str | Path, *, items_fingerprint: str, kind: str, n_items: int, dim: int,
               mmap: bool = True) -> faiss.Index:
    """A prebuilt index for exactly these items and this kind, else IndexFileError (one line).
    mmap: the vectors/codes are mapped read-only from the file (page cache shared by the workers
    of one host) instead of copied onto the heap."""
    meta = read_sidecar(path)
    if meta["kind"] != kind:
        raise IndexFileError(f"index file {path} is a {meta['kind']} index, the worker is set to --index {kind}")
    if meta["items_fingerprint"] != items_fingerprint:
        raise IndexFileError(
            f"index file {path} was built for items {meta['items_fingerprint']}, the items are {items_fingerprint}: "
            f"rebuild it with `livemb index --items ITEMS --index {kind} --out {path}`")
    try:
        index = faiss.read_index(str(path), MMAP_FLAG | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as e:
        raise IndexFileError(f"index file {path} is unreadable: {str(e).splitlines()[0][:200]}") from None
    if index.ntotal != n_items or index.d != dim:
        raise IndexFileError(f"index file {path} holds {index.ntotal} x {index.d}, the items are {n_items} x {dim}")
    set_search_params(index, kind, meta["params"])
    return index


def build_index_file(items_path: str | Path, kind: str, out: str | Path, params: dict | None = None,
                     progress: bool = True) -> dict:
    """`livemb index`: build ahead of time and save; returns the sidecar."""
    table = ItemTable.load(items_path)
    p = index_params(kind, len(table), table.dim, params)
    t0 = time.perf_counter()
    index = build_index(table.padded_vectors(), kind, params=p, progress=progress)
    seconds = time.perf_counter() - t0
    save_index(index, out, items_fingerprint=table.fingerprint, kind=kind, params=p, build_seconds=round(seconds, 3))
    return read_sidecar(out)


class Retriever:
    def __init__(self, vectors: np.ndarray, kind: str = "flat", topk: int = 20, exclude_seen: str | None = None,
                 index: faiss.Index | None = None):
        """`index`: a prebuilt index over vectors[1:] (`load_index`); None builds one here (hnsw, ivfpq).
        `exclude_seen` None: the served model's own choice (`SeqModel.served`)."""
        if exclude_seen is not None and exclude_seen not in EXCLUDE_SEEN:
            raise ValueError(f"exclude_seen must be one of {', '.join(EXCLUDE_SEEN)}, got {exclude_seen!r}")
        self.kind, self.topk, self.exclude_seen = kind, topk, exclude_seen
        self.n_items = vectors.shape[0] - 1
        if index is not None and (index.ntotal != self.n_items or index.d != vectors.shape[1]):
            raise IndexFileError(f"prebuilt index holds {index.ntotal} x {index.d}, the items are {self.n_items} x "
                             f"{vectors.shape[1]}")
        # flat searches with one torch pass over the model's item vectors (candidates): a faiss copy
        # of the catalogue would only cost memory (256 MB at 1M items) and start-up time
        self.index = index if index is not None or kind == "flat" else build_index(
            vectors, kind, progress=self.n_items >= 200_000)

    def flat_search(self, model: SeqModel, u: torch.Tensor, mem_item: torch.Tensor, want_logz: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Exact explore hits: the top `topk` items outside each user's memory (the memory path
        scores those), as (B, k) scores and 1-based items, and the mixture's exact log Z over the
        whole catalogue, from ONE pass of scores per chunk of users.

        Why not `s.topk(topk + M)` over (B, N) scores: that selection cost as much as the product
        (~1.7 ns per score). Memory items are masked first, so only `topk` hits are needed, and
        they are picked from the blocks of 64 items with the highest maxima (the top k items lie
        in the k best blocks): one cheap max per block, then a top-k over k * 64 scores.
        The scores go into a reused buffer (a fresh (B, N) tensor per batch cost page faults)."""
        vecs = model.item_vecs  # (N+1, D), row 0 = padding item
        B, N1 = u.shape[0], vecs.shape[0]
        Np = -(-N1 // SCORE_BLOCK) * SCORE_BLOCK
        rows = max(1, min(B, SCORE_BUFFER_FLOATS // Np))
        buf = self._score_buffer(rows, Np, u.device)
        k = min(self.topk, self.n_items)
        top_s = torch.empty(B, k, device=u.device)
        top_i = torch.empty(B, k, dtype=torch.long, device=u.device)
        logz = torch.empty(B, device=u.device) if want_logz else None
        neg = float("-inf")
        with torch.no_grad():
            for a in range(0, B, rows):  # chunks of users, not events: one pass at batch <= rows
                b = min(B, a + rows)
                full = buf[: b - a]  # (C, Np); columns N1.. are padding
                s = full[:, :N1]  # column j = item j
                torch.mm(u[a:b].float(), vecs.float().T, out=s)
                full[:, N1:] = neg
                s[:, 0] = neg
                mem = mem_item[a:b]  # (C, M), 0 = empty slot
                saved = s.gather(1, mem)
                s.scatter_(1, mem, neg)
                top_s[a:b], top_i[a:b] = block_topk(full, k, SCORE_BLOCK)
                if logz is not None:  # log Z over every item: put the memory items' scores back
                    s.scatter_(1, mem, saved)
                    ref = torch.maximum(top_s[a:b, :1], saved.amax(dim=1, keepdim=True))  # the row's max
                    logz[a:b] = sum_exp(s.sub_(ref)).log_() + ref[:, 0]
        top_i = top_i.masked_fill(~torch.isfinite(top_s), 0)  # fewer than k items outside the memory
        return top_s, top_i, logz

    def _score_buffer(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        buf = getattr(self, "_scores", None)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != device:
            buf = self._scores = torch.empty(rows, cols, device=device)
        return buf

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

    def candidates(self, model: SeqModel, state: dict[str, torch.Tensor], u: torch.Tensor,
                   extension: Extension | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, K) item indices (1-based, 0 = no candidate; -(s + 1): the open catalogue's new item
        in slot s of the user's pool, models/newitems.py; -(S + 1 + e): row e of the new-item
        `extension`, models/newvectors.py, searched exactly beside the index) and scores, best first."""
        M = state["mem_item"].shape[1]
        k = min(self.topk + M, self.n_items)
        logz = None
        mode = model.served_mode  # the served variant's repeat path (models.repeat.Variant)
        exclude_seen = self.exclude_seen or model.served.exclude_seen
        if self.kind == "flat":
            f_scores, f_items, logz = self.flat_search(model, u, state["mem_item"].long(), mode == "mixture")
            f_items, f_scores = f_items.cpu(), f_scores.cpu()
        else:
            q = np.ascontiguousarray(u.detach().float().cpu().numpy())
            f_scores, f_ids = self.index.search(q, k)  # (B, k), ids 0-based, -1 when missing
            f_items = torch.from_numpy(f_ids + 1)  # 1-based; 0 = missing
            f_scores = torch.from_numpy(f_scores)
            if mode == "mixture":
                logz = self.estimated_logz(model, u, f_scores.to(u.device).masked_fill(f_items.to(u.device) == 0, -np.inf))

        mem_item = state["mem_item"].long().cpu()
        pool = newitems.as_memory(state)  # the open catalogue's new items: scored, never searched
        with torch.no_grad():  # the one explore+repeat score (models.base.SeqModel.memory_scores)
            shift, m_scores = model.memory_scores(state, u, mode, logz=logz, novec=pool)
        f_scores = f_scores + shift.float().cpu()[:, None]
        refs = mem_item if pool is None else torch.cat([mem_item, newitems.slot_refs(state).cpu()], dim=1)
        m_scores = m_scores.float().cpu().masked_fill(refs == 0, -np.inf)
        # drop faiss hits that the memory already scores (with the repeat bonus)
        dup = (f_items[:, :, None] == mem_item[:, None, :]).any(-1) | (f_items == 0)
        f_scores = f_scores.masked_fill(dup, -np.inf)
        seen_fields = ("mem_item", "mem_sess", "session")
        excluded = repeat.seen_mask({k: state[k].cpu() for k in seen_fields}, self.n_items + 1, exclude_seen)
        if excluded is not None:
            f_scores = f_scores.masked_fill(excluded.gather(1, f_items), -np.inf)
            gone = excluded.gather(1, mem_item)
            if pool is not None:
                gone = torch.cat([gone, repeat.excluded_slots({k: v.cpu() for k, v in pool.items()}, exclude_seen)], 1)
            m_scores = m_scores.masked_fill(gone, -np.inf)
        items = torch.cat([f_items, refs], dim=1)
        scores = torch.cat([f_scores, m_scores], dim=1)
        if extension is not None and len(extension) and pool is not None:
            e_items, e_scores = self.extension_hits(extension, state, u)
            items = torch.cat([items, e_items], dim=1)
            scores = torch.cat([scores, e_scores + shift.float().cpu()[:, None]], dim=1)
        K = min(self.topk, scores.shape[1])
        top_scores, pos = scores.topk(K, dim=1)
        top_items = items.gather(1, pos).masked_fill(~torch.isfinite(top_scores), 0)
        return top_items.numpy(), top_scores.numpy()


    def extension_hits(self, extension: Extension, state: dict[str, torch.Tensor], u: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top `topk` of the new-item extension per user, exact: (B, k) references
        -(S + 1 + e) and explore scores <u, v_e> (-inf for none), the user's own pool items left
        out (the pool scores them)."""
        S = state["new_key"].shape[1]
        with torch.no_grad():
            s = u.float() @ extension.vecs.T  # (B, E)
        keys = torch.from_numpy(extension.keys).to(s.device)
        s = s.masked_fill((keys[None, :, None] == state["new_key"][:, None, :].to(s.device)).any(2), -np.inf)
        top_s, top_e = s.topk(min(self.topk, s.shape[1]), dim=1)
        refs = (-(S + 1) - top_e).masked_fill(~torch.isfinite(top_s), 0)
        return refs.cpu(), top_s.cpu()


SCORE_BLOCK = 64  # items per block of the exact top-k's first pass
SCORE_BUFFER_FLOATS = 1 << 23  # 32 MB of float32 scores per chunk of users (163 users at 50k items)


def block_topk(s: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(s, k, dim=1) for s of shape (B, nb * block): the top k values of a row lie in
    the k blocks with the largest maxima, so one max per block, a top-k over the nb maxima and
    one over the k * block scores of the chosen blocks replace the selection over all columns.
    Values are exactly torch.topk's; among equal scores the order may differ (ties are
    arbitrary in both)."""
    B, n = s.shape
    nb = n // block
    blocks = s.view(B, nb, block)
    kb = min(k, nb)
    _, best = blocks.amax(dim=2).topk(kb, dim=1, sorted=False)  # (B, kb)
    rows = torch.arange(B, device=s.device)[:, None]
    cand = blocks[rows, best].reshape(B, kb * block)  # (B, kb * block)
    vals, j = cand.topk(k, dim=1)
    return vals, best.gather(1, j // block) * block + j % block


def sum_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) summed over dim 1, x (B, n) overwritten with exp(x). On the CPU through numpy's
    float32 exp (AVX-512/AVX2 kernels): half the time of torch's exp_ on the live batch's (B, N)
    scores (docs/BENCHMARKS.md), within 2e-7 relative of it."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        xn = x.numpy()  # a view: strided rows are fine, each row is contiguous
        np.exp(xn, out=xn)
    else:
        x.exp_()
    return x.sum(dim=1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k (ids distinct per row)."""
    hit = (approx_ids[:, :, None] == exact_ids[:, None, :]).any(-1) & (approx_ids >= 0)
    return float(hit.sum() / exact_ids.size)


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


def recall_vs_exact(vectors: np.ndarray, kind: str, queries: np.ndarray, k: int = 20, params: dict | None = None) -> float:
    """Recall@k of an approximate index against exact search (reported by the benchmark)."""
    exact = build_index(vectors, "flat").search(queries, k)[1]
    approx = build_index(vectors, kind, params=params).search(queries, k)[1]
    return recall_at_k(approx, exact)
