"""The choices of the settings' and the models' and tools' options, defined once, free of heavy imports.

The command line's parser (tools/cli.py) offers them without importing torch, pandas or pydantic
(`livemb --help` starts in a fraction of a second); models/ and tools/data/item_embeddings.py
validate against these same tuples, and core/settings.py declares its fields with the Literal types.
"""

from __future__ import annotations

from typing import Literal, get_args

# The choices of a setting: the settings, the CLI, the retriever and evaluation read them from here.
ExcludeSeen = Literal["none", "session", "history"]
EXCLUDE_SEEN: tuple[str, ...] = get_args(ExcludeSeen)
RepeatPath = Literal["rep", "rule", "norep"]
REPEAT_PATHS: tuple[str, ...] = get_args(RepeatPath)
IndexKind = Literal["flat", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)

LOSSES = ("hinge", "bpr", "nce", "l2", "ce")  # explore-path training losses (models/train.py)
VALID_METRICS = ("recall@10", "mrr")  # early stopping's metric (models/early_stop.py)
REPEAT_MODES = ("mixture", "rule", "none")  # the repeat path of a model (models/repeat.py)
# PPMI-SVD item-vector kinds built from a log (tools/data/item_embeddings.py, docs/MODELS.md)
ITEM_VECTOR_KINDS = ("symmetric+pop", "symmetric", "directed", "symmetric+pop+recent")
