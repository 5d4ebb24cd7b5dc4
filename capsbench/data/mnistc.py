"""MNIST-C's affine corruptions (Mu & Gilmer 2019): shear, rotate, scale and translate at its five
severities, rebuilt with our own warps (:mod:`capsbench.data.transforms`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from capsbench.data.transforms import _check_generator, _translate_into, affine, as_float_batch, rotate
from capsbench.errors import ConfigError

# --------------------------------------------------------------------------- MNIST-C affine

# MNIST-C (Mu & Gilmer 2019, arXiv:1906.02337), file corruptions.py of
# github.com/google-research/mnist-c. Each affine corruption has five severities; the
# published dataset uses each function's default severity (shear 2, rotate 2, scale 3,
# translate 3). Their code warps with skimage ``transform.warp(x, inverse_map=aff)`` where
# ``aff`` maps OUTPUT (col, row) to INPUT (col, row) about the centre (13.5, 13.5), bilinear
# (order=1), zero fill; the functions below rebuild the same forward maps with our own code.
_MNISTC_SHEAR = (0.2, 0.4, 0.6, 0.8, 1.0)  # shear angle in radians, random sign
_MNISTC_ROTATE = (0.2, 0.4, 0.6, 0.8, 1.0)  # rotation in radians, random sign
_MNISTC_SCALE = (0.9, 0.8, 0.7, 0.6, 0.5)  # zoom-out factor (inverse map scales by 1/c)
_MNISTC_TRANSLATE = (1, 2, 3, 4, 5)  # pixels per axis, random sign per axis

MNISTC_DEFAULT_SEVERITY: dict[str, int] = {"shear": 2, "rotate": 2, "scale": 3, "translate": 3}
"""Severities used for the published MNIST-C dataset (the defaults in corruptions.py)."""


def _mnistc_level(table: Sequence, severity: int, fn: str):
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ConfigError(f"{fn}: severity must be an integer 1..5, got {severity!r}")
    return table[severity - 1]


def _random_signs(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Independent fair +-1 (float64, CPU)."""
    return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1


def mnistc_shear(x: Tensor, severity: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """MNIST-C ``shear``: shear angle c = [0.2, 0.4, 0.6, 0.8, 1.0][severity-1] rad, random sign.

    MNIST-C used ``skimage.transform.AffineTransform(shear=c)`` as the output-to-input map.
    In the skimage of 2019 that matrix is ``[[1, -sin c], [0, cos c]]`` (newer skimage
    changed the meaning of ``shear``), whose inverse, the forward map, is
    ``[[1, tan c], [0, 1 / cos c]] = shear(sin c) @ diag(1, 1 / cos c)`` in our convention:
    an x-shear plus a slight vertical stretch (8.6% at the default severity).

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        severity: 1..5; the published dataset uses 2 (c = 0.4 rad).
        generator: CPU generator for the per-image sign.

    Returns:
        (B, 1, H, W) float32.
    """
    c = _mnistc_level(_MNISTC_SHEAR, severity, "mnistc_shear")
    x = as_float_batch(x)
    sign = _random_signs((x.shape[0],), _check_generator(generator, "mnistc_shear"))
    return affine(x, shear=math.sin(c) * sign, scale=(1.0, 1.0 / math.cos(c)))


def mnistc_rotate(x: Tensor, severity: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """MNIST-C ``rotate``: a fixed angle c = [0.2, ..., 1.0][severity-1] rad with random sign.

    The angle magnitude is fixed, not drawn from a range: at the published severity 2 every
    image turns by exactly 0.4 rad (22.92 degrees), clockwise or counter-clockwise with
    probability 1/2 each.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        severity: 1..5; the published dataset uses 2.
        generator: CPU generator for the per-image sign.

    Returns:
        (B, 1, H, W) float32.
    """
    c = _mnistc_level(_MNISTC_ROTATE, severity, "mnistc_rotate")
    x = as_float_batch(x)
    sign = _random_signs((x.shape[0],), _check_generator(generator, "mnistc_rotate"))
    return rotate(x, sign * math.degrees(c))


def mnistc_scale(x: Tensor, severity: int = 3, generator: torch.Generator | None = None) -> Tensor:
    """MNIST-C ``scale``: shrink about the centre by [0.9, 0.8, 0.7, 0.6, 0.5][severity-1].

    MNIST-C's output-to-input map scales by 1/c on both axes, i.e. the digit shrinks to
    c of its size (0.7 at the published severity 3). Deterministic; ``generator`` is
    accepted only so all MNIST-C functions share one signature.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        severity: 1..5; the published dataset uses 3.
        generator: ignored.

    Returns:
        (B, 1, H, W) float32.
    """
    c = _mnistc_level(_MNISTC_SCALE, severity, "mnistc_scale")
    return affine(x, scale=c)


def mnistc_translate(
    x: Tensor, severity: int = 3, generator: torch.Generator | None = None
) -> Tensor:
    """MNIST-C ``translate``: shift by c = [1, 2, 3, 4, 5][severity-1] px on both axes.

    Each axis gets its own random sign, so an image moves diagonally by (+-c, +-c); at the
    published severity 3 that is 3 px in x and 3 px in y. The integer shift is exact, as in
    MNIST-C (bilinear sampling at integer offsets).

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        severity: 1..5; the published dataset uses 3.
        generator: CPU generator for the signs.

    Returns:
        (B, 1, H, W) float32.
    """
    c = _mnistc_level(_MNISTC_TRANSLATE, severity, "mnistc_translate")
    x = as_float_batch(x)
    signs = _random_signs((x.shape[0], 2), _check_generator(generator, "mnistc_translate"))
    d = (signs * c).to(torch.int64)  # (B, 2): dx, dy
    return _translate_into(x, x.shape[2], x.shape[3], d[:, 0], d[:, 1])


MNISTC_AFFINE: dict[str, Callable[..., Tensor]] = {
    "shear": mnistc_shear,
    "rotate": mnistc_rotate,
    "scale": mnistc_scale,
    "translate": mnistc_translate,
}
"""The four MNIST-C affine corruptions by name; call as ``fn(x, severity, generator)``."""
