"""One registry for every model: capsule models here, CNN baselines from ``baselines/``."""

from __future__ import annotations

from typing import Any

from torch import nn

from capsbench.registry import Registry

MODELS: Registry = Registry("model")


def register_model(name: str, **meta: Any):
    """Decorator: ``@register_model("capsnet", family="capsule")`` on a factory function."""
    return MODELS.register(name, **meta)


def _ensure_loaded() -> None:
    # The baselines live in a top-level package of their own; importing it registers them.
    # Imported lazily so `capsbench.models` has no import cycle with `baselines`.
    import baselines  # noqa: F401
    import capsbench.models.capsnet  # noqa: F401


def create_model(name: str, **kw: Any) -> nn.Module:
    """Build a registered model. Keyword arguments that are None are dropped, so unset CLI
    flags fall back to the model's defaults.

    Example:
        >>> m = create_model("lenet5", input_size=28)
        >>> sum(p.numel() for p in m.parameters())
        61706
    """
    _ensure_loaded()
    factory = MODELS.get(name)
    model = factory(**{k: v for k, v in kw.items() if v is not None})
    model.model_name = name
    return model


def list_models(pattern: str = "*") -> list[str]:
    _ensure_loaded()
    return MODELS.names(pattern)


def model_info(name: str) -> dict[str, Any]:
    _ensure_loaded()
    return MODELS.meta(name)
