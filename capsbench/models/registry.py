"""One registry for every model. The package (``capsbench.models``) imports the modules that fill it:
capsule models (``capsnet.py``) and CNN baselines (``baselines/``).

Models from outside capsbench come in two ways, neither of which edits capsbench:

* an installed package declares an entry point in the group ``capsbench.models``
  (``[project.entry-points."capsbench.models"] my_caps = "my_pkg.models:my_caps"``); it is
  listed by :func:`list_models` and imported only when the model is built;
* ``pkg.module:factory`` wherever a model name goes (``--models``, ``create_model``), registered
  under the factory's name on first use (:func:`resolve_model`).

Either way the factory's result goes through :func:`capsbench.models.base.as_classifier`, which
checks it against the model protocol (docs/models.md) and wraps a plain ``nn.Module`` that
returns logits.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from capsbench.errors import CapsbenchError, ConfigError, describe
from capsbench.models.base import as_classifier
from capsbench.registry import Registry

MODELS: Registry = Registry("model")
ENTRY_POINT_GROUP = "capsbench.models"
_entry_points_loaded = False


def register_model(name: str, **meta: Any):
    """Decorator: ``@register_model("capsnet", family="capsule")`` on a factory function."""
    return MODELS.register(name, **meta)


class _EntryPointFactory:
    """A plug-in's factory, imported when the model is first built (listing imports nothing)."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self._factory: Callable[..., Any] | None = None

    def load(self) -> Callable[..., Any]:
        if self._factory is None:
            try:
                self._factory = self.ep.load()
            except Exception as e:  # any failure to import a plug-in is the plug-in's, in one line
                raise ConfigError(f"model {self.ep.name!r}: its entry point {self.ep.value} (group "
                                  f"{ENTRY_POINT_GROUP}) failed to import: {describe(e)}") from None
            if not callable(self._factory):
                raise ConfigError(f"model {self.ep.name!r}: its entry point {self.ep.value} is a "
                                  f"{type(self._factory).__name__}, not a factory function or class")
        return self._factory

    def __call__(self, **kw: Any) -> Any:
        return self.load()(**kw)


def _load_entry_points() -> None:
    """Register every installed plug-in model once (not imported yet: see _EntryPointFactory)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in MODELS:
            continue  # a name capsbench (or an earlier plug-in) already has stays theirs
        dist = getattr(getattr(ep, "dist", None), "name", None)
        MODELS.add(ep.name, _EntryPointFactory(ep), source=ep.value, plugin=dist or "entry point")


def resolve_model(spec: str) -> str:
    """The registered name of ``spec``: a model name as it is, or ``pkg.module:factory``, which
    is imported and registered under the factory's name the first time.

    Example:
        >>> resolve_model("capsnet")
        'capsnet'
    """
    _load_entry_points()
    if ":" not in spec:
        MODELS.get(spec)  # unknown: one line that lists the known names
        return spec
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model {spec!r}: write a plug-in model as pkg.module:factory")
    name = attr.rpartition(".")[2]
    if name in MODELS:
        if MODELS.meta(name).get("source") == spec:
            return name
        raise ConfigError(f"model {spec!r}: the name {name!r} is taken by another model; give the factory "
                          "another name, or register it through an entry point")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"model {spec!r}: cannot import {module_name}: {describe(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model {spec!r}: {attr} is a {type(obj).__name__}, not a factory function or class")
    MODELS.add(name, obj, source=spec, plugin="module:factory")
    return name


def _accepted(factory: Callable[..., Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a plug-in factory takes (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return kw
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kw
    names = {p.name for p in params}
    return {k: v for k, v in kw.items() if k in names}


def create_model(name: str, **kw: Any) -> nn.Module:
    """Build a registered model (or ``pkg.module:factory``). Keyword arguments that are None are
    dropped, so unset CLI flags fall back to the model's defaults; a plug-in's factory gets only
    those it takes, and its model is checked against the model protocol.

    Example:
        >>> m = create_model("lenet5", input_size=28)
        >>> sum(p.numel() for p in m.parameters())
        61706
    """
    name = resolve_model(name)
    factory = MODELS.get(name)
    meta = MODELS.meta(name)
    kw = {k: v for k, v in kw.items() if v is not None}
    source = meta.get("source")
    if source is None:
        model = factory(**kw)
    else:
        if isinstance(factory, _EntryPointFactory):
            factory = factory.load()
        try:
            model = factory(**_accepted(factory, kw))
        except CapsbenchError:
            raise
        except Exception as e:
            raise ConfigError(f"model {name!r}: its factory {source} raised {describe(e)}") from None
        model = as_classifier(model, name, input_size=kw.get("input_size"), source=source)
    model.model_name = name
    return model


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names (capsbench's and installed plug-ins') matching a glob pattern."""
    _load_entry_points()
    return MODELS.names(pattern)


def model_info(name: str) -> dict[str, Any]:
    """What a model was registered with (family, version; ``source`` for a plug-in)."""
    return MODELS.meta(resolve_model(name))
