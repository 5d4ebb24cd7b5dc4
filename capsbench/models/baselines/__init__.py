"""CNN baselines for capsbench, registered into capsbench's model registry on import.

Each module holds one family; the named variants are small factories at its bottom.
"""

from capsbench.models.baselines import cnn, efficientnet, lenet, steerable  # noqa: F401  (import registers the models)
