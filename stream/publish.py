"""The `recommendations` message (SPEC section 5): one per user per micro-batch, latest state."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import orjson
import torch


def build_messages(
    users: Sequence[str],
    u: torch.Tensor,
    state: dict[str, torch.Tensor],
    items: np.ndarray,
    scores: np.ndarray,
    table,
    event_ts: np.ndarray,
    model_tag: str,
    emitted_at: int,
) -> Iterator[tuple[str, bytes]]:
    """Yield (user_id, JSON bytes). One device->host copy per batch; a Python loop per user only
    to assemble each user's JSON (never per dimension)."""
    emb = u.detach().float().cpu().numpy()
    sessions = state["session"].cpu().numpy()
    ids = table.id_of(items)  # (B, K) str, '' for "no candidate"
    for b, user in enumerate(users):
        keep = items[b] > 0
        cands = [{"item_id": i, "score": float(s)} for i, s in zip(ids[b][keep].tolist(), scores[b][keep].tolist(), strict=True)]
        yield user, orjson.dumps(
            {
                "user_id": user,
                "embedding": emb[b],
                "candidates": cands,
                "session_id": f"{user}:{int(sessions[b])}",
                "event_ts": int(event_ts[b]),
                "emitted_at": emitted_at,
                "model": model_tag,
                "items_version": table.fingerprint,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
