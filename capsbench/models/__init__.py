"""Models: CapsNet variants (``capsnet.py``), Efficient-CapsNet (``efficient_capsnet.py``), matrix
capsules with EM routing (``em_capsnet.py``) and the CNN
baselines (``baselines/``), one registry."""

from capsbench.models.base import Classifier, ModelOutput, count_parameters
from capsbench.models.registry import create_model, list_models, model_info, register_model

# importing the model modules registers them (the registry itself imports none of them)
from capsbench.models import baselines, capsnet, efficient_capsnet, em_capsnet  # noqa: E402, F401  isort: skip

__all__ = [
    "Classifier",
    "ModelOutput",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
