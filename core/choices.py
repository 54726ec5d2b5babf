"""The choices of the models' and offline tools' options, defined once and free of torch/pandas.

The command line's parser (tools/cli.py) offers them without importing the heavy modules that
use them (`livemb --help` starts in a fraction of a second); models/train.py, models/repeat.py and
tools/data/item_embeddings.py validate against these same tuples. The settings' own choices
(exclude_seen, repeat_path, index) live with the settings, core/settings.py.
"""

from __future__ import annotations

LOSSES = ("hinge", "bpr", "nce", "l2", "ce")  # explore-path training losses (models/train.py)
VALID_METRICS = ("recall@10", "mrr")  # early stopping's metric (models/early_stop.py)
REPEAT_MODES = ("mixture", "rule", "none")  # the repeat path of a model (models/repeat.py)
# PPMI-SVD item-vector kinds built from a log (tools/data/item_embeddings.py, docs/MODELS.md)
ITEM_VECTOR_KINDS = ("symmetric+pop", "symmetric", "directed", "symmetric+pop+recent")
