"""One registry for every model. The package (``capsbench.models``) imports the modules that fill it:
capsule models (``capsnet.py``) and CNN baselines (``baselines/``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from capsbench.registry import Registry

MODELS: Registry = Registry("model")


def register_model(name: str, **meta: Any):
    """Decorator: ``@register_model("capsnet", family="capsule")`` on a factory function."""
    return MODELS.register(name, **meta)


def create_model(name: str, **kw: Any) -> nn.Module:
    """Build a registered model. Keyword arguments that are None are dropped, so unset CLI
    flags fall back to the model's defaults.

    Example:
        >>> m = create_model("lenet5", input_size=28)
        >>> sum(p.numel() for p in m.parameters())
        61706
    """
    factory = MODELS.get(name)
    model = factory(**{k: v for k, v in kw.items() if v is not None})
    model.model_name = name
    return model


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def model_info(name: str) -> dict[str, Any]:
    return MODELS.meta(name)
