"""Serving a model: the unit the live worker and offline `livemb embed` share, so their outputs agree.

`Serving` bundles what one batch needs (model, item table, retriever, `<name>@<version>` tag) and
is swapped as a whole on a hot reload. `advance` is the one batched model step; `messages` runs
the one faiss search of the batch and builds the `recommendations` JSON (SPEC section 5).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson
import torch

from livemb.core.choices import ExcludeSeen, IndexKind, RepeatPath
from livemb.core.errors import ConfigError
from livemb.core.items import ItemTable
from livemb.models.base import EventBatch, SeqModel
from livemb.models.checkpoint import load_checkpoint, model_version
from livemb.models.newitems import candidate_ids
from livemb.models.newvectors import Extension
from livemb.models.repeat import Variant
from livemb.models.retrieval import IndexFileError, Retriever, load_index

log = logging.getLogger("livemb.serving")

_VECTOR = {"type": "array", "items": {"type": "number"}, "minItems": 1}
# The `recommendations` message (SPEC section 5): every field `build_messages` writes, as JSON
# Schema properties. stream/contracts.py makes docs/schemas/recommendations.schema.json of it and
# tests/test_contracts.py checks real messages against it, field for field.
MESSAGE_FIELDS: dict[str, dict] = {
    "user_id": {"type": "string", "minLength": 1, "description": "the user (also the Kafka key)"},
    "dim": {"type": "integer", "minimum": 1, "description": "length of `embedding` and `next_session_embedding` "
            "(the item-vector dimension D); a consumer holding vectors of another length meets a new model"},
    "embedding": {**_VECTOR, "description": "u_t: the user's embedding in item space after the latest event "
                  "(score(item) = <u_t, x_item>); dim floats"},
    "candidates": {"type": "array", "description": "top-K, best first: the explore path's faiss hits merged with "
                   "the repeat path's scores, seen items removed per exclude_seen",
                   "items": {"type": "object", "required": ["item_id", "score"], "additionalProperties": False,
                             "properties": {"item_id": {"type": "string"}, "score": {"type": "number"}}}},
    "session_id": {"type": "string", "description": "<user_id>:<session counter>"},
    "event_ts": {"type": "integer", "description": "ts of the user's latest applied event (epoch ms)"},
    "emitted_at": {"type": "integer", "description": "when the message was built (epoch ms)"},
    "model": {"type": "string", "pattern": "^.+@.+$", "description": "<name>@<version> of the checkpoint"},
    "items_version": {"type": "string", "description": "fingerprint of the item table"},
    "next_session_embedding": {"oneOf": [_VECTOR, {"type": "null"}], "description": "the embedding to use if "
                               "the next event opens a new session (dim floats); null for models without sessions"},
    "session_closed": {"const": True, "description": "only on the idle sweep's message for a timed-out session"},
}
MESSAGE_REQUIRED = tuple(k for k in MESSAGE_FIELDS if k != "session_closed")


@dataclass
class Serving:
    model: SeqModel
    table: ItemTable
    retriever: Retriever
    tag: str  # "<name>@<version>"

    @classmethod
    def load(cls, model_path: str, items_path: str, *, index: IndexKind = "flat", topk: int = 20,
             exclude_seen: ExcludeSeen | None = None, repeat_path: RepeatPath | None = None, device: str = "cpu",
             allow_new_items: bool = False,
             index_path: str | None = None, stale_index: Literal["refuse", "rebuild"] = "refuse") -> Serving:
        """`exclude_seen`, `repeat_path`: override the variant the checkpoint chose (None keeps it).
        `index_path`: a prebuilt index (`livemb index`) loaded instead of building one; one that
        does not match the items/kind raises IndexFileError (`stale_index="refuse"`, start-up) or
        is replaced by an index built here with a warning (`"rebuild"`, a hot swap of the items)."""
        table = ItemTable.load(items_path)
        model = load_checkpoint(model_path, table.padded_vectors(), table.fingerprint, allow_new_items=allow_new_items,
                                categories=table.category_codes())
        if not model.embeds:
            raise ConfigError(f"model {model.name} has no user embedding; only embedding models can be served")
        model.to(device).eval()
        model.served = Variant(repeat_path or model.served.repeat, exclude_seen or model.served.exclude_seen)
        vectors = table.padded_vectors()
        prebuilt = None
        if index_path is not None:
            try:
                prebuilt = load_index(index_path, items_fingerprint=table.fingerprint, kind=index,
                                      n_items=len(table), dim=table.dim)
            except IndexFileError as e:
                if stale_index != "rebuild":
                    raise
                log.warning("%s; building a %s index for items %s instead", e, index, table.fingerprint)
        retriever = Retriever(vectors, index, topk, index=prebuilt)
        return cls(model, table, retriever, f"{model.name}@{model_version(model_path)}")

    def advance(self, state: dict[str, torch.Tensor], ev: EventBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One batched step of every user of the batch through their events: (new state, u (B, D))."""
        with torch.no_grad():
            return self.model.step(state, ev.to(self.model.device))

    def messages(self, users: Sequence[str], state: dict[str, torch.Tensor], u: torch.Tensor,
                 event_ts: np.ndarray, emitted_at: int) -> Iterator[tuple[str, bytes]]:
        """Top-K for the batch (one search) and one output message per user."""
        return self.recommend(users, state, u, event_ts, emitted_at)[1]

    def recommend(self, users: Sequence[str], state: dict[str, torch.Tensor], u: torch.Tensor,
                  event_ts: np.ndarray, emitted_at: int, extension: Extension | None = None
                  ) -> tuple[np.ndarray, Iterator[tuple[str, bytes]]]:
        """`messages`, and the (B, K) candidate item indices they carry (0 = none; the worker
        stores them for its online quality metrics, stream/quality.py). `extension`: the new
        items with a stream vector (models/newvectors.py), searched beside the index."""
        items, scores = self.retriever.candidates(self.model, state, u, extension)
        with torch.no_grad():
            next_emb = self.model.next_session_embedding(state)  # None for models without sessions
        return items, build_messages(users, u, state, items, scores, self.table, event_ts, self.tag, emitted_at,
                                     next_emb, extension=extension)


def build_messages(
    users: Sequence[str],
    u: torch.Tensor,
    state: dict[str, torch.Tensor],
    items: np.ndarray,
    scores: np.ndarray,
    table: ItemTable,
    event_ts: np.ndarray,
    model_tag: str,
    emitted_at: int,
    next_emb: torch.Tensor | None = None,
    extra: dict | None = None,
    extension: Extension | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Yield (user_id, JSON bytes). One device->host copy per batch; a Python loop per user only
    to assemble each user's JSON (never per dimension). `next_emb` (B, D): each user's
    `next_session_embedding` (SPEC section 5; null for models without a session hierarchy);
    `extra`: fields added to every message (the idle sweep's `session_closed`)."""
    emb = u.detach().float().cpu().numpy()
    nxt = next_emb.detach().float().cpu().numpy() if next_emb is not None else None
    sessions = state["session"].cpu().numpy()
    ids = candidate_ids(items, table, state, extension)  # (B, K) str, '' for "no candidate", new items' own ids
    dim = int(emb.shape[1])
    for b, user in enumerate(users):
        keep = items[b] != 0
        cands = [{"item_id": i, "score": float(s)} for i, s in zip(ids[b][keep].tolist(), scores[b][keep].tolist(), strict=True)]
        yield user, orjson.dumps(
            {
                "user_id": user,
                "dim": dim,
                "embedding": emb[b],
                "candidates": cands,
                "session_id": f"{user}:{int(sessions[b])}",
                "event_ts": int(event_ts[b]),
                "emitted_at": emitted_at,
                "model": model_tag,
                "items_version": table.fingerprint,
                "next_session_embedding": nxt[b] if nxt is not None else None,
                **(extra or {}),
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
