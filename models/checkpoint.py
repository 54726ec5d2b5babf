"""Checkpoints: weights + the config that built them + the fingerprint of the item table.

Plain tensors and builtins only, loaded with `torch.load(weights_only=True)`; never a pickled
module. Loading refuses a different item table (fingerprint) unless the caller opts in, e.g. a
live swap of item vectors with the same dimension.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from livemb.core.errors import DataError
from livemb.models.base import MODEL_REGISTRY, ModelConfig, SeqModel
from livemb.models.repeat import DEFAULT_RULE, RuleWeights, Variant

FORMAT = 3  # 3: the repeat head's slot scorer reads behaviour features only; 2: repeat mixture head, compact memory


class CheckpointError(DataError):
    """A checkpoint that cannot be read or does not fit the given items."""


def save_checkpoint(path: str | Path, model: SeqModel, items_fingerprint: str, extra: dict | None = None) -> None:
    blob = {
        "format": FORMAT,
        "model": model.name,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "items_fingerprint": items_fingerprint,
        "served": model.served.name,  # the variant chosen from the training data (models.repeat.Variant)
        "rule": model.rule.to_dict(),  # the rule's weights chosen from the training data (models.repeat.RuleWeights)
        "gate_shift": float(model.gate_shift),  # the mixture gate's shift chosen from the training data (SeqModel.gate_shift)
        "extra": extra or {},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: a watcher never sees half a file


def read_checkpoint(path: str | Path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"checkpoint {path} is not a livemb checkpoint: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else "?"
        raise CheckpointError(
            f"checkpoint {path} has format {got}, this build reads format {FORMAT} (the model structure "
            "changed: the repeat head's slot scorer reads behaviour features only); retrain it with `livemb train`"
        )
    return blob


def load_checkpoint(path: str | Path, item_vectors, items_fingerprint: str, allow_new_items: bool = False,
                    categories=None) -> SeqModel:
    """Rebuild the model from its own config; refuse an item table it was not trained with.
    `categories`: the table's category codes (ItemTable.category_codes), for a model that reads them."""
    blob = read_checkpoint(path)
    if blob["items_fingerprint"] != items_fingerprint and not allow_new_items:
        raise CheckpointError(
            f"checkpoint {path} was trained with item table {blob['items_fingerprint']}, "
            f"but the given items have fingerprint {items_fingerprint}; pass the matching items.npz "
            "(or allow a swap of item vectors explicitly)"
        )
    cfg = ModelConfig.from_dict(blob["config"])
    if cfg.name not in MODEL_REGISTRY:
        raise CheckpointError(f"checkpoint {path} holds unknown model {cfg.name!r}")
    shape = tuple(item_vectors.shape)
    if len(shape) != 2 or shape[1] != cfg.dim:
        beside = Path(path).with_suffix(".items.npz")
        hint = f" ({beside}, saved beside it by `livemb train`)" if beside.exists() else ""
        raise CheckpointError(
            f"checkpoint {path} was trained on {cfg.dim}-d item vectors, but the given item vectors have shape "
            f"{shape} (N+1 rows with the unknown item): pass the items file it was trained with{hint}"
        )
    model = MODEL_REGISTRY[cfg.name](cfg, item_vectors)
    try:
        model.set_item_categories(categories)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match model {cfg.name}: {e}") from e
    try:
        model.served = Variant.parse(blob.get("served", Variant().name))
        model.rule = RuleWeights.from_dict(blob.get("rule", DEFAULT_RULE.to_dict()))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    shift = blob.get("gate_shift", 0.0)  # a checkpoint without it serves the gate as trained
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift):
        raise CheckpointError(f"checkpoint {path}: gate_shift must be a finite number, got {shift!r}")
    model.gate_shift = float(shift)
    model.eval()
    return model


def model_version(path: str | Path) -> str:
    """Short content hash used as `<name>@<version>` in outputs and metrics."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
