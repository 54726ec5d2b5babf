"""Models: one file per model, one interface (models.base.SeqModel). Importing registers them all."""

from livemb.models import baselines, flat, hgru, hiergru, hiertcn, hrnn, simple  # noqa: F401  (registration)
from livemb.models.base import MODEL_REGISTRY, EventBatch, ModelConfig, SeqModel

__all__ = ["MODEL_REGISTRY", "EventBatch", "ModelConfig", "SeqModel"]
