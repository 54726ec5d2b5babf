"""Group-by-user, defined once: the live batch (stream/processor.py) and training (models/train.py)
both cut event arrays into per-user sequences with it."""

from __future__ import annotations

import numpy as np

_FEW_EVENTS = 64  # up to this many events: a dict pass (np.unique's sort of object keys costs ~0.1 ms)


def group_by_user(users: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """users: (N,) user keys in arrival order. Returns the distinct users in order of first
    appearance and, per user, the positions of their events in arrival order (vectorized: one
    sort, no loop over events; a live batch of a few events by one dict pass, the same result)."""
    if 0 < len(users) <= _FEW_EVENTS:
        pos: dict = {}
        for i, u in enumerate(users.tolist()):
            pos.setdefault(u, []).append(i)
        keys = np.empty(len(pos), dtype=users.dtype)
        keys[:] = list(pos)
        return keys, [np.array(v, dtype=np.intp) for v in pos.values()]
    uniq, first, inverse = np.unique(users, return_index=True, return_inverse=True)
    order = np.argsort(first)  # users in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    r = rank[inverse.reshape(-1)]
    by_user = np.argsort(r, kind="stable")  # stable: arrival order kept within a user
    cuts = np.cumsum(np.bincount(r, minlength=len(order)))[:-1]
    return uniq[order], np.split(by_user, cuts)
