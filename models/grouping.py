"""Group-by-user, defined once: the live batch (stream/processor.py) and training (models/train.py)
both cut event arrays into per-user sequences with it."""

from __future__ import annotations

import numpy as np


def group_by_user(users: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """users: (N,) user keys in arrival order. Returns the distinct users in order of first
    appearance and, per user, the positions of their events in arrival order (vectorized: one
    sort, no loop over events)."""
    uniq, first, inverse = np.unique(users, return_index=True, return_inverse=True)
    order = np.argsort(first)  # users in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    r = rank[inverse.reshape(-1)]
    by_user = np.argsort(r, kind="stable")  # stable: arrival order kept within a user
    cuts = np.cumsum(np.bincount(r, minlength=len(order)))[:-1]
    return uniq[order], np.split(by_user, cuts)
