"""capsbench: are Capsule Networks really more robust than CNNs? Measure it.

Example:
    >>> import capsbench
    >>> "capsnet" in capsbench.list_models()
    True
"""

from capsbench.errors import CapsbenchError, ConfigError, DataError, TrainingError
from capsbench.models import create_model, list_models

__version__ = "0.1.0"


def load_dataset(name: str, split: str, root=None):
    """Load ``mnist`` or ``fashion_mnist`` (``train``/``test``) as uint8 tensors.

    See :func:`capsbench.data.load_dataset`.
    """
    from capsbench.data import load_dataset as _load

    return _load(name, split, root=root)


__all__ = [
    "CapsbenchError",
    "ConfigError",
    "DataError",
    "TrainingError",
    "create_model",
    "list_models",
    "load_dataset",
    "__version__",
]
