"""The Python API in one place: a model object in, tidy rows out; a run folder in, a table out.

    >>> import capsbench
    >>> rows = capsbench.evaluate(my_model, suite="rotation", profile="smoke")   # doctest: +SKIP
    >>> rows[rows.metric == "accuracy"].groupby("cell").value.mean()              # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from capsbench.errors import ConfigError
from capsbench.evaluation.run import run_suite
from capsbench.models.registry import MODELS, list_models
from capsbench.report.claims import Claim, evaluate_claim, list_claims
from capsbench.report.load import load_run, load_runs
from capsbench.report.stats import holm
from capsbench.store import atomic_torch_save


class _ObjectFactory:
    """The factory of a model object handed to :func:`evaluate`: the object itself."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, **kw: Any) -> nn.Module:
        return self.model


def evaluate(
    model: nn.Module,
    suite: str = "rotation",
    *,
    name: str | None = None,
    profile: str = "quick",
    out: str | os.PathLike = "runs",
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Score a trained model on every cell of ``suite``; returns the run's rows (the columns of
    results.csv) for this model.

    ``model``: a trained ``nn.Module`` following the model protocol (docs/models.md; a plain
    module that returns logits works as it is), at the suite's input size. ``name``: its name in
    the rows (default: the ``model_name`` capsbench gave it, else its class name in lower case).
    Nothing is trained: the weights are saved under ``<out>/checkpoints/`` and scored as a
    ``--checkpoint`` job (seed 0), on the same test images (the profile's evaluation sample)
    as ``capsbench run --suite SUITE --profile PROFILE`` into the same ``out``, so its rows and
    predictions sit beside the other models' and claims can compare them.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"evaluate: model is a {type(model).__name__}, not a torch.nn.Module")
    name = name or getattr(model, "model_name", None) or type(model).__name__.lower()
    if ":" in name or "/" in name:
        raise ConfigError(f"evaluate: name {name!r} may not hold ':' or '/'")
    if name in list_models():  # capsbench's and the installed plug-ins'
        factory = MODELS.get(name)
        if isinstance(factory, _ObjectFactory):
            factory.model = model
        elif getattr(model, "model_name", None) != name:  # a capsbench model keeps its factory
            raise ConfigError(f"evaluate: the name {name!r} is taken by a registered model; pass name=...")
    else:
        MODELS.add(name, _ObjectFactory(model), source=f"object:{type(model).__module__}.{type(model).__qualname__}",
                   plugin="object")
    out = Path(out)
    ckpt = out / "checkpoints" / f"{name}.pt"
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, ckpt)
    # several seeds of one model: capsbench.run_suite(..., checkpoints={name: [seed0.pt, seed1.pt, ...]})
    run_dir = run_suite(suite, models=[name], profile=profile, device=device, out=out, data_root=data_root,
                        progress=False, log=log, command=f"capsbench.evaluate({name}, suite={suite!r})",
                        checkpoints={name: str(ckpt)})
    rows = load_results(run_dir)
    return rows[rows["model"] == name].reset_index(drop=True)


def load_results(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's ``results.csv`` as a DataFrame: one row per model, seed, cell and metric, names as
    text, values as floats. A folder that is not a run directory is one clear error."""
    return load_run(run_dir).rows.copy()


def verdicts(run_dirs: Sequence[str | os.PathLike], claims: Sequence[Claim] | None = None,
             compare: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """The claim verdicts for ``run_dirs`` as a table (the report's verdicts.csv): the registered
    claims (or ``claims``) and ``compare`` pairs, one Holm family, the report's verdict rule."""
    from capsbench.report.build import comparison_claims
    from capsbench.report.cost import is_profile_run

    runs = [r for r in load_runs([Path(d) for d in run_dirs]) if not is_profile_run(r)]
    chosen = list(list_claims() if claims is None else claims) + comparison_claims(runs, compare)
    found = [v for c in chosen for v in evaluate_claim(c, runs)]
    for v, adjusted in zip(found, holm([v.p_value for v in found]), strict=True):
        v.p_holm = adjusted
    return pd.DataFrame([v.as_row() for v in found])

