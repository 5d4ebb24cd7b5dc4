"""capsbench: are Capsule Networks really more robust than CNNs? Measure it.

The public API is imported on first use, so ``import capsbench`` (and ``capsbench --help``)
does not load torch.

Example:
    >>> import capsbench
    >>> "capsnet" in capsbench.list_models()
    True
"""

from __future__ import annotations

import importlib
from typing import Any

from capsbench.errors import CapsbenchError, ConfigError, DataError, TrainingError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "create_model": "capsbench.models.registry",
    "list_models": "capsbench.models.registry",
    "model_info": "capsbench.models.registry",
    "register_model": "capsbench.models.registry",
    "load_dataset": "capsbench.data.datasets",
    "evaluate": "capsbench.evaluation.api",
    "load_results": "capsbench.evaluation.api",
    "verdicts": "capsbench.evaluation.api",
    "run_suite": "capsbench.evaluation.run",
    "write_report": "capsbench.report.build",
    "Claim": "capsbench.report.claims",
    "register_claim": "capsbench.report.claims",
    "list_claims": "capsbench.report.claims",
    "load_claims": "capsbench.report.claims",
    "list_suites": "capsbench.suites.base",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'capsbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CapsbenchError",
    "ConfigError",
    "DataError",
    "TrainingError",
    "__version__",
    *_LAZY,
]
