"""Models: CapsNet variants (here) and the CNN baselines (``baselines/``), one registry."""

from capsbench.models.base import Classifier, ModelOutput, count_parameters
from capsbench.models.registry import create_model, list_models, model_info, register_model

__all__ = [
    "Classifier",
    "ModelOutput",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
