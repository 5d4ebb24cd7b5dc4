"""Batched, seeded image transforms for the robustness suites and for augmentation.

Every function takes a batch ``x`` of shape (B, 1, H, W), float in [0, 1] (uint8 batches of
shape (B, H, W) or (B, 1, H, W) are accepted too and scaled by 1/255, see
:func:`as_float_batch`), and returns a float32 batch (B, 1, H', W') on the input's device.
Nothing loops over pixels or samples in Python: geometry goes through
``F.affine_grid``/``F.grid_sample`` or through integer index gathers.

Conventions shared by all functions:

* Pixel coordinates are ``(x, y) = (column, row)`` with row 0 at the top, so ``y`` grows
  downwards, and pixel centres sit at integer indices. The image centre is
  ``((W - 1) / 2, (H - 1) / 2)`` (13.5 for MNIST), which is also where MNIST-C puts it.
* Positive angles rotate counter-clockwise *as the image is displayed* (row 0 at the top):
  ``rotate(x, 90)`` equals ``torch.rot90(x, 1, dims=(-2, -1))`` up to interpolation error.
* Translations ``(dx, dy)`` move the content right by ``dx`` and down by ``dy`` pixels.
* Randomness comes only from the ``generator`` argument, a CPU :class:`torch.Generator`.
  Random numbers are drawn on the CPU and then moved to the input's device, so a seed gives
  the same transform parameters on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.errors import ConfigError

PerImage = float | int | Tensor
"""A scalar applied to every image, or a (B,) tensor with one value per image."""

Pair = PerImage | tuple[PerImage, PerImage] | list[PerImage]

_MODES = ("bilinear", "nearest", "bicubic")

__all__ = [
    "affine",
    "affnist_like",
    "as_float_batch",
    "jitter_on_canvas",
    "part_shuffle",
    "place_on_canvas",
    "random_affine_params",
    "random_derangements",
    "random_place",
    "random_shift",
    "rotate",
    "shift",
    "tile_swap",
    "valid_tile_counts",
]


# --------------------------------------------------------------------------- helpers


def as_float_batch(x: Tensor) -> Tensor:
    """Bring an image batch to the (B, 1, H, W) float32 layout every transform works on.

    Args:
        x: (B, H, W) or (B, 1, H, W) tensor, either uint8 in [0, 255] (scaled by 1/255) or
            floating point in [0, 1] (cast to float32, values untouched).

    Returns:
        (B, 1, H, W) float32 tensor on ``x``'s device.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: the shape or dtype is not one of the above.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected an image batch tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(
            f"expected an image batch of shape (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"image batch has an empty spatial size: {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise ValueError(
            f"expected uint8 (0..255) or floating point (0..1) images, got dtype {x.dtype}"
        )
    return x.to(torch.float32)


def _check_generator(generator: object, fn: str) -> torch.Generator:
    # A CUDA generator would draw different numbers than a CPU one for the same seed, which
    # breaks the promise that a seed means the same transform on every device.
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn} needs a torch.Generator (generator=...), got {generator!r}")
    if generator.device.type != "cpu":
        raise ValueError(f"{fn} needs a CPU torch.Generator, got one on {generator.device}")
    return generator


def _per_image(value: PerImage, n: int, name: str) -> Tensor:
    """A scalar or (n,) tensor as an (n,) float64 CPU tensor (theta is built in float64)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a (B,) tensor, got a bool")
    if isinstance(value, Tensor):
        v = value.detach().to("cpu", torch.float64)
        if v.dim() == 0:
            return v.expand(n).clone()
        if v.shape != (n,):
            raise ValueError(
                f"{name} must be a scalar or a tensor of shape ({n},) (one per image), "
                f"got shape {tuple(value.shape)}"
            )
        return v
    if isinstance(value, (int, float)):
        return torch.full((n,), float(value), dtype=torch.float64)
    raise TypeError(f"{name} must be a number or a (B,) tensor, got {type(value).__name__}")


def _per_image_int(value: PerImage, n: int, name: str) -> Tensor:
    """Like :func:`_per_image` but for exact integer shifts: (n,) int64 on the CPU."""
    v = _per_image(value, n, name)
    if not torch.equal(v, v.round()):
        raise ValueError(f"{name} must be integer pixel offsets, got {value!r}")
    return v.to(torch.int64)


def _pair(value: Pair, n: int, name: str, *, second_default: float | None) -> tuple[Tensor, Tensor]:
    """Split a pair argument into two (n,) float64 tensors.

    A tuple/list gives (first, second). A lone scalar or (n,) tensor gives
    ``(value, value)`` when ``second_default`` is None (e.g. isotropic scale) and
    ``(value, second_default)`` otherwise (e.g. a lone shear is an x-shear).
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a pair (x, y), got {len(value)} values")
        return _per_image(value[0], n, f"{name}[0]"), _per_image(value[1], n, f"{name}[1]")
    first = _per_image(value, n, name)
    if second_default is None:
        return first, first.clone()
    return first, torch.full((n,), second_default, dtype=torch.float64)


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ConfigError(f"unknown interpolation mode {mode!r}; use one of {', '.join(_MODES)}")
    return mode


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _out_size(out_size: int | Sequence[int] | None, h: int, w: int) -> tuple[int, int]:
    if out_size is None:
        return h, w
    if isinstance(out_size, int) and not isinstance(out_size, bool):
        return _positive_int(out_size, "out_size"), out_size
    if isinstance(out_size, Sequence) and len(out_size) == 2:
        return _positive_int(out_size[0], "out_size[0]"), _positive_int(out_size[1], "out_size[1]")
    raise ConfigError(f"out_size must be an int or a pair (H, W), got {out_size!r}")


def _randint_inclusive(lo: Tensor, hi: Tensor, generator: torch.Generator) -> Tensor:
    """One uniform integer in [lo[i], hi[i]] per row; lo, hi are (n,) int64 with lo <= hi."""
    # torch.randint takes one range for the whole tensor; per-row ranges come from scaling a
    # float64 uniform, whose bias (~1e-16 per value) is far below anything measurable.
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
    v = lo + torch.floor(u * (hi - lo + 1).to(torch.float64)).to(torch.int64)
    return torch.minimum(v, hi)


# --------------------------------------------------------------------------- geometry core


def _linear_part(angle_deg: Tensor, shx: Tensor, shy: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    """Forward 2x2 matrices A = R(angle) @ Shear @ Scale in (x right, y down) pixel coords.

    All inputs are (B,) float64; returns (B, 2, 2) float64.
    """
    rad = torch.deg2rad(angle_deg)
    c, s = torch.cos(rad), torch.sin(rad)
    # Counter-clockwise on screen with y pointing down: (1, 0) -> (cos, -sin).
    rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # (B, 2, 2)
    one = torch.ones_like(shx)
    shear = torch.stack([torch.stack([one, shx], -1), torch.stack([shy, one], -1)], -2)
    zero = torch.zeros_like(sx)
    scale = torch.stack([torch.stack([sx, zero], -1), torch.stack([zero, sy], -1)], -2)
    return rot @ shear @ scale


def _warp(x: Tensor, a_inv: Tensor, t: Tensor, out_hw: tuple[int, int], mode: str) -> Tensor:
    """Resample ``x`` under the forward map ``p_out = A p_in + t`` about the image centres.

    Args:
        x: (B, 1, H, W) float32.
        a_inv: (B, 2, 2) float64 CPU, the inverse of the forward linear part A.
        t: (B, 2) float64 CPU, translation (dx, dy) in output pixels.
        out_hw: output size (H', W'); the centre of the input maps to the centre of the output.
        mode: grid_sample interpolation mode.

    Returns:
        (B, 1, H', W') float32, zero where the source falls outside the input.
    """
    b, _, h, w = x.shape
    ho, wo = out_hw
    if b == 0:
        return x.new_zeros((0, 1, ho, wo))
    # affine_grid maps OUTPUT normalised coords to INPUT normalised coords, so we build the
    # inverse map. With align_corners=False the normalised coordinate n relates to the
    # centred pixel offset p by p = n * size / 2 (pixel centres at (2i + 1) / size - 1), so
    #   p_in = A^-1 (p_out - t)  becomes  n_in = D_in^-1 A^-1 D_out n_out - D_in^-1 A^-1 t,
    # with D = diag(W / 2, H / 2) of the respective image. Sizes may differ and need not be
    # square; building theta this way keeps pixels square in both images.
    d_in_inv = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
    d_out = torch.tensor([wo / 2.0, ho / 2.0], dtype=torch.float64)
    m = d_in_inv[None, :, None] * a_inv * d_out[None, None, :]  # (B, 2, 2)
    offset = -d_in_inv[None, :] * (a_inv @ t.unsqueeze(-1)).squeeze(-1)  # (B, 2)
    theta = torch.cat([m, offset.unsqueeze(-1)], dim=-1)  # (B, 2, 3)
    theta = theta.to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, [b, 1, ho, wo], align_corners=False)  # (B, H', W', 2)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if mode == "bicubic":
        # Bicubic weights overshoot; keep the [0, 1] promise.
        out = out.clamp_(0.0, 1.0)
    return out


def _translate_into(x: Tensor, out_h: int, out_w: int, off_x: Tensor, off_y: Tensor) -> Tensor:
    """Exact integer placement: ``out[b, 0, i, j] = x[b, 0, i - off_y[b], j - off_x[b]]``.

    Sources outside ``x`` read as zero. ``off_x``/``off_y`` are (B,) int64 (any device).
    Returns (B, 1, out_h, out_w) float32 on ``x``'s device.
    """
    b, _, h, w = x.shape
    dev = x.device
    if dev.type == "cuda" and off_x.device.type == "cpu":
        # offsets drawn on the CPU (seeded, the same on every device) go up in one pinned,
        # asynchronous copy: a pageable copy would stall the host on every training step
        offs = torch.stack([off_x, off_y]).pin_memory().to(dev, non_blocking=True)
        off_x, off_y = offs[0], offs[1]
    off_x = off_x.to(dev)
    off_y = off_y.to(dev)
    rows = torch.arange(out_h, device=dev)[None, :] - off_y[:, None]  # (B, out_h) source rows
    cols = torch.arange(out_w, device=dev)[None, :] - off_x[:, None]  # (B, out_w) source cols
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(b, device=dev)[:, None, None]  # (B, 1, 1) broadcast index
    gathered = x[:, 0][batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    out = torch.where(valid, gathered, torch.zeros((), dtype=x.dtype, device=dev))
    return out.unsqueeze(1)  # (B, out_h, out_w) -> (B, 1, out_h, out_w)


# --------------------------------------------------------------------------- affine family


def affine(
    x: Tensor,
    *,
    angle_deg: PerImage = 0.0,
    shear: Pair = 0.0,
    scale: Pair = 1.0,
    translate_px: Pair = 0.0,
    out_size: int | Sequence[int] | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """General per-image affine transform about the image centre, with zero fill.

    The forward map, in centred pixel coordinates ``p = (x - cx, y - cy)`` with y down, is
    ``p_out = R(angle) @ [[1, shx], [shy, 1]] @ diag(sx, sy) @ p_in + (dx, dy)``: scale
    first, then shear, then rotate (counter-clockwise on screen for positive angles), then
    translate. The input centre lands on the output centre (plus the translation), so with
    ``out_size`` larger than the input the untransformed image sits in the middle of the
    canvas.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        angle_deg: rotation in degrees, scalar or (B,).
        shear: shear factors ``(shx, shy)``; a lone value is an x-shear
            (``x' = x + shx * y``). Each entry scalar or (B,).
        scale: scale factors ``(sx, sy)``; a lone value scales both axes.
        translate_px: ``(dx, dy)`` in output pixels (right, down); a lone value moves both.
        out_size: output size ``(H', W')`` (or one int for a square); default the input size.
        mode: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``.

    Returns:
        (B, 1, H', W') float32 on ``x``'s device.

    Raises:
        ConfigError: unknown mode, bad out_size, or a singular (non-invertible) transform.
        ValueError: bad input shape, or a per-image parameter of the wrong length.
    """
    x = as_float_batch(x)
    mode = _check_mode(mode)
    b, _, h, w = x.shape
    angle = _per_image(angle_deg, b, "angle_deg")
    shx, shy = _pair(shear, b, "shear", second_default=0.0)
    sx, sy = _pair(scale, b, "scale", second_default=None)
    dx, dy = _pair(translate_px, b, "translate_px", second_default=None)
    a = _linear_part(angle, shx, shy, sx, sy)
    det = torch.linalg.det(a) if b else torch.ones(0, dtype=torch.float64)
    if bool((det.abs() < 1e-12).any()):
        raise ConfigError("affine: the transform is singular (a scale of 0 or shx * shy == 1)")
    return _warp(x, torch.linalg.inv(a), torch.stack([dx, dy], -1), _out_size(out_size, h, w), mode)


def rotate(x: Tensor, degrees: PerImage, *, mode: str = "bilinear") -> Tensor:
    """Rotate each image about its centre, zero fill, same size.

    Positive angles turn the image counter-clockwise as displayed (row 0 at the top), so
    ``rotate(x, 90)`` matches ``torch.rot90(x, 1, dims=(-2, -1))`` up to interpolation.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        degrees: angle in degrees, a scalar or a (B,) tensor (one angle per image).
        mode: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``.

    Returns:
        (B, 1, H, W) float32 on ``x``'s device.
    """
    return affine(x, angle_deg=degrees, mode=mode)


def random_rotate(x: Tensor, max_degrees: float, generator: torch.Generator) -> Tensor:
    """Rotate each image about its centre by an angle uniform in [-max_degrees, max_degrees]
    (bilinear, zero fill): rotation-augmented training (``+rotN`` protocols).

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        max_degrees: the largest angle, in (0, 180].
        generator: CPU generator.

    Returns:
        (B, 1, H, W) float32 on ``x``'s device.
    """
    x = as_float_batch(x)
    _check_generator(generator, "random_rotate")
    angles = (torch.rand(x.shape[0], generator=generator, dtype=torch.float64) * 2 - 1) * float(max_degrees)
    return rotate(x, angles)


def random_affine_params(
    n: int,
    generator: torch.Generator,
    *,
    max_rotation: float = 20.0,
    max_shear: float = 0.2,
    scale_range: tuple[float, float] = (0.8, 1.2),
) -> dict[str, Tensor]:
    """Draw affNIST-style affine parameters, independently and uniformly per image.

    Args:
        n: number of images.
        generator: CPU generator.
        max_rotation: angles are uniform in [-max_rotation, max_rotation] degrees.
        max_shear: the x-shear factor is uniform in [-max_shear, max_shear].
        scale_range: ``scale_x`` and ``scale_y`` are independent, uniform in this range.

    Returns:
        Dict of (n,) float32 CPU tensors: ``angle_deg``, ``shear`` (x-shear factor),
        ``scale_x``, ``scale_y``; pass them to :func:`affine` as
        ``affine(x, angle_deg=p["angle_deg"], shear=p["shear"],
        scale=(p["scale_x"], p["scale_y"]))``.
    """
    _check_generator(generator, "random_affine_params")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"random_affine_params: n must be a non-negative integer, got {n!r}")
    if max_rotation < 0 or max_shear < 0:
        raise ConfigError("random_affine_params: max_rotation and max_shear must be >= 0")
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ConfigError(f"random_affine_params: need 0 < low <= high, got {scale_range!r}")
    # One (n, 4) draw, row-major, so image i's parameters do not depend on n.
    u = torch.rand((n, 4), generator=generator, dtype=torch.float64)
    return {
        "angle_deg": ((2 * u[:, 0] - 1) * max_rotation).float(),
        "shear": ((2 * u[:, 1] - 1) * max_shear).float(),
        "scale_x": (lo + u[:, 2] * (hi - lo)).float(),
        "scale_y": (lo + u[:, 3] * (hi - lo)).float(),
    }


def _first_last_true(mask: Tensor) -> tuple[Tensor, Tensor]:
    """First and last True index along dim 1 of a (B, N) bool mask (0, N-1 if none)."""
    n = mask.shape[1]
    first = mask.to(torch.uint8).argmax(dim=1)
    last = n - 1 - mask.flip(1).to(torch.uint8).argmax(dim=1)
    return first, last


def _window_range(first: Tensor, last: Tensor, has_ink: Tensor, big: int, win: int):
    """Allowed top-left offsets [lo, hi] of a ``win`` window that covers the ink [first, last].

    Offsets are in render coordinates and may fall outside [0, big - win]: the window may
    stick out of the render, whose outside reads as zero, so the digit can go anywhere on
    the canvas as long as its ink does.
    """
    centred = (big - win) // 2
    lo = last - win + 1
    hi = first.clone()
    # The ink is wider than the window: no placement keeps it all, so centre on the ink.
    too_big = lo > hi
    fallback = (first + last + 1) // 2 - win // 2
    lo = torch.where(too_big, fallback, lo)
    hi = torch.where(too_big, fallback, hi)
    # A blank image has no bounding box; leave it centred.
    lo = torch.where(has_ink, lo, torch.full_like(lo, centred))
    hi = torch.where(has_ink, hi, torch.full_like(hi, centred))
    return lo, hi


def affnist_like(
    images_28: Tensor,
    generator: torch.Generator,
    *,
    canvas: int = 40,
    max_rotation: float = 20.0,
    max_shear: float = 0.2,
    scale_range: tuple[float, float] = (0.8, 1.2),
    mode: str = "bilinear",
    return_params: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Generate an affNIST-style batch: random affine, then a random shift that keeps the ink.

    Each image gets a random rotation, x-shear and independent x/y scale from
    :func:`random_affine_params`, applied about the digit's centre. The result is rendered
    on a canvas large enough to hold the whole transformed input, the bounding box of its
    nonzero pixels is measured, and a ``canvas`` x ``canvas`` window is cut out at an offset
    drawn uniformly among all integer offsets that keep that bounding box inside. This equals
    translating the digit by a uniform integer shift with the ink box inside the canvas, and
    no pixel is re-interpolated by the shift. If the ink box is larger than the canvas (which
    needs ink well outside MNIST's central 20x20 box), the window is centred on the ink and
    some ink is lost. Blank images stay centred.

    Args:
        images_28: (B, 1, H, W) batch, usually 28x28 MNIST (see :func:`as_float_batch`).
        generator: CPU generator.
        canvas: output side length; must be at least max(H, W).
        max_rotation, max_shear, scale_range: see :func:`random_affine_params`.
        mode: interpolation mode of the affine step.
        return_params: also return the parameters.

    Returns:
        (B, 1, canvas, canvas) float32 on the input's device; with ``return_params`` also a
        dict with the :func:`random_affine_params` entries plus ``dx``, ``dy`` ((B,) int64,
        the shift from the centred position), such that the output equals
        ``affine(x, angle_deg=..., shear=..., scale=(scale_x, scale_y),
        translate_px=(dx, dy), out_size=canvas)`` up to float rounding.
    """
    x = as_float_batch(images_28)
    _check_generator(generator, "affnist_like")
    mode = _check_mode(mode)
    b, _, h, w = x.shape
    canvas = _positive_int(canvas, "canvas")
    if canvas < max(h, w):
        raise ConfigError(f"affnist_like: canvas={canvas} is smaller than the {h}x{w} images")
    params = random_affine_params(
        b, generator, max_rotation=max_rotation, max_shear=max_shear, scale_range=scale_range
    )
    a = _linear_part(
        params["angle_deg"].double(),
        params["shear"].double(),
        torch.zeros(b, dtype=torch.float64),
        params["scale_x"].double(),
        params["scale_y"].double(),
    )
    # Render on a canvas that holds the transformed input box of every image, so no ink is
    # cut off before we choose where the window goes. The box is the input's sampling
    # footprint: the pixels plus the reach of the interpolation kernel (up to 2 px for
    # bicubic); two of its corners, as (x, y) columns, bound the extent by symmetry. The
    # render's parity matches ``canvas`` so the centred window sits at an integer offset.
    half = torch.tensor([[w / 2 + 2, h / 2 + 2], [w / 2 + 2, -h / 2 - 2]], dtype=torch.float64)
    reach = (a @ half.T).abs().amax(dim=(0, 2)) if b else torch.zeros(2, dtype=torch.float64)
    big_w = max(canvas, 2 * math.ceil(float(reach[0])) + 2)
    big_h = max(canvas, 2 * math.ceil(float(reach[1])) + 2)
    big_w += (big_w - canvas) % 2
    big_h += (big_h - canvas) % 2
    rendered = _warp(
        x, torch.linalg.inv(a), torch.zeros(b, 2, dtype=torch.float64), (big_h, big_w), mode
    )  # (B, 1, big_h, big_w), digit centred

    ink = rendered[:, 0] > 0  # (B, big_h, big_w)
    rows_any = ink.any(dim=2).cpu()  # (B, big_h)
    cols_any = ink.any(dim=1).cpu()  # (B, big_w)
    has_ink = rows_any.any(dim=1)
    top, bottom = _first_last_true(rows_any)
    left, right = _first_last_true(cols_any)
    lo_y, hi_y = _window_range(top, bottom, has_ink, big_h, canvas)
    lo_x, hi_x = _window_range(left, right, has_ink, big_w, canvas)
    # One (B, 2) draw: column 0 is the x offset, column 1 the y offset.
    lo = torch.stack([lo_x, lo_y], -1)
    hi = torch.stack([hi_x, hi_y], -1)
    off = _randint_inclusive(lo, hi, generator)  # (B, 2) window top-left in render coords
    out = _translate_into(rendered, canvas, canvas, -off[:, 0], -off[:, 1])
    if not return_params:
        return out
    params = dict(params)
    params["dx"] = (big_w - canvas) // 2 - off[:, 0]
    params["dy"] = (big_h - canvas) // 2 - off[:, 1]
    return out, params


# --------------------------------------------------------------------------- integer shifts


def shift(x: Tensor, dx: PerImage, dy: PerImage) -> Tensor:
    """Exact integer translation with zero fill (no interpolation).

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        dx: pixels to the right (negative: left), integer scalar or (B,) tensor.
        dy: pixels down (negative: up), integer scalar or (B,) tensor.

    Returns:
        (B, 1, H, W) float32; ink moved past the border is lost.

    Raises:
        ValueError: a non-integer shift or a bad shape.
    """
    x = as_float_batch(x)
    b, _, h, w = x.shape
    return _translate_into(x, h, w, _per_image_int(dx, b, "dx"), _per_image_int(dy, b, "dy"))


def _check_shift(max_shift: object, fn: str) -> int:
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ConfigError(f"{fn}: max_shift must be a non-negative integer, got {max_shift!r}")
    return max_shift


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by independent integers uniform in [-max_shift, max_shift] per axis.

    This is the CapsNet paper's training augmentation (``max_shift=2``).

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        max_shift: largest shift in pixels, >= 0.
        generator: CPU generator.

    Returns:
        (B, 1, H, W) float32, zero filled.
    """
    x = as_float_batch(x)
    m = _check_shift(max_shift, "random_shift")
    _check_generator(generator, "random_shift")
    d = torch.randint(-m, m + 1, (x.shape[0], 2), generator=generator)  # (B, 2): dx, dy
    return _translate_into(x, x.shape[2], x.shape[3], d[:, 0], d[:, 1])


def _check_canvas(x: Tensor, canvas: object, fn: str) -> int:
    h, w = x.shape[2], x.shape[3]
    if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < max(h, w):
        raise ConfigError(
            f"{fn}: canvas must be an integer >= the image size {h}x{w}, got {canvas!r}"
        )
    return canvas


def place_on_canvas(x: Tensor, canvas: int, dx: PerImage = 0, dy: PerImage = 0) -> Tensor:
    """Pad images onto a ``canvas`` x ``canvas`` black canvas, centred, then shift by (dx, dy).

    For a 28x28 digit on a 40x40 canvas the centred box starts at row/column 6. When
    ``canvas - H`` is odd the extra pixel goes to the bottom/right.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        canvas: side length, >= max(H, W).
        dx, dy: integer shifts from the centred position (right, down), scalar or (B,).

    Returns:
        (B, 1, canvas, canvas) float32; ink shifted past the canvas edge is lost.
    """
    x = as_float_batch(x)
    canvas = _check_canvas(x, canvas, "place_on_canvas")
    b, _, h, w = x.shape
    off_x = (canvas - w) // 2 + _per_image_int(dx, b, "dx")
    off_y = (canvas - h) // 2 + _per_image_int(dy, b, "dy")
    return _translate_into(x, canvas, canvas, off_x, off_y)


def random_place(x: Tensor, canvas: int, generator: torch.Generator) -> Tensor:
    """Put each image at a uniformly random integer position fully inside the canvas.

    This is the "expanded MNIST" of the CapsNet paper: 28x28 digits on a 40x40 canvas, i.e.
    up to 6 pixels from the centre in each direction. Nothing is ever cut off.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        canvas: side length, >= max(H, W).
        generator: CPU generator.

    Returns:
        (B, 1, canvas, canvas) float32.
    """
    x = as_float_batch(x)
    canvas = _check_canvas(x, canvas, "random_place")
    _check_generator(generator, "random_place")
    b, _, h, w = x.shape
    span = torch.tensor([canvas - w, canvas - h]).expand(b, 2)  # (B, 2) largest x, y offset
    off = _randint_inclusive(torch.zeros_like(span), span, generator)  # (B, 2) box top-left
    return _translate_into(x, canvas, canvas, off[:, 0], off[:, 1])


def jitter_on_canvas(x: Tensor, canvas: int, max_shift: int, generator: torch.Generator) -> Tensor:
    """Centre images on a canvas, then shift each by integers uniform in [-max_shift, max_shift].

    Unlike :func:`random_place` the shift range is independent of the canvas; ink pushed
    past the edge (when ``max_shift`` exceeds the margin) is lost.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        canvas: side length, >= max(H, W).
        max_shift: largest shift per axis, >= 0.
        generator: CPU generator.

    Returns:
        (B, 1, canvas, canvas) float32.
    """
    x = as_float_batch(x)
    canvas = _check_canvas(x, canvas, "jitter_on_canvas")
    m = _check_shift(max_shift, "jitter_on_canvas")
    _check_generator(generator, "jitter_on_canvas")
    d = torch.randint(-m, m + 1, (x.shape[0], 2), generator=generator)  # (B, 2): dx, dy
    return place_on_canvas(x, canvas, d[:, 0], d[:, 1])


# --------------------------------------------------------------------------- tile shuffles


def valid_tile_counts(h: int, w: int) -> list[int]:
    """The k for which a h x w image splits into k x k equal tiles (common divisors)."""
    return [k for k in range(1, min(h, w) + 1) if h % k == 0 and w % k == 0]


def _check_k(x: Tensor, k: object, fn: str) -> int:
    h, w = x.shape[2], x.shape[3]
    valid = valid_tile_counts(h, w)
    if isinstance(k, bool) or not isinstance(k, int) or k not in valid:
        raise ConfigError(
            f"{fn}: k={k!r} tiles per side must divide the {h}x{w} image; "
            f"valid k for this size: {', '.join(map(str, valid))}"
        )
    return k


def random_derangements(n_rows: int, n: int, generator: torch.Generator) -> Tensor:
    """Uniformly random derangements of ``range(n)``, one per row.

    Method: draw uniform permutations (argsort of uniform noise) and redraw only the rows
    that have a fixed point until none does. This is exact rejection sampling, so every
    derangement is equally likely; at least a third of the draws are derangements for any
    n >= 2 (about 1/e for large n), so the loop runs O(log n_rows) vectorised rounds. The
    result is deterministic for a given generator state. For n == 1 no derangement exists
    and the identity is returned.

    Args:
        n_rows: how many permutations.
        n: length of each permutation.
        generator: CPU generator.

    Returns:
        (n_rows, n) int64 CPU tensor; ``perm[r, j] != j`` for all j when n >= 2.
    """
    ident = torch.arange(n)
    if n == 1:
        return torch.zeros((n_rows, 1), dtype=torch.int64)
    noise = torch.rand((n_rows, n), generator=generator, dtype=torch.float64)
    perm = noise.argsort(dim=1, stable=True)  # (n_rows, n) uniform random permutations
    bad = (perm == ident).any(dim=1)
    for _ in range(10_000):
        idx = bad.nonzero().squeeze(1)
        if idx.numel() == 0:
            return perm
        noise = torch.rand((idx.numel(), n), generator=generator, dtype=torch.float64)
        perm[idx] = noise.argsort(dim=1, stable=True)
        bad[idx] = (perm[idx] == ident).any(dim=1)
    # Unreachable in practice (each round keeps a row with probability <= 2/3); the cyclic
    # shift j -> j + 1 is a derangement, so the contract holds even then.
    perm[bad] = torch.roll(ident, -1)
    return perm


def _apply_tile_perm(x: Tensor, k: int, perm: Tensor) -> Tensor:
    """Output tile j (row-major tile index) is input tile ``perm[b, j]``."""
    b, c, h, w = x.shape
    th, tw = h // k, w // k
    tiles = x.reshape(b, c, k, th, k, tw)  # (B, C, tile_row, th, tile_col, tw)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(b, k * k, c, th, tw)  # (B, k*k, C, th, tw)
    batch = torch.arange(b, device=x.device)[:, None]  # (B, 1) broadcast index
    tiles = tiles[batch, perm.to(x.device)]  # (B, k*k, C, th, tw), gathered per image
    tiles = tiles.reshape(b, k, k, c, th, tw)  # (B, tile_row, tile_col, C, th, tw)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)  # back to (B, C, H, W)


def part_shuffle(
    x: Tensor, k: int, generator: torch.Generator, *, return_perm: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Cut each image into k x k tiles and rearrange them with a random derangement.

    Every image gets its own uniformly random derangement (see
    :func:`random_derangements`), so no tile stays in place when k >= 2. The pixels are
    only moved, never changed. k = 1 leaves the image unchanged.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        k: tiles per side; must divide both H and W.
        generator: CPU generator.
        return_perm: also return the permutation.

    Returns:
        (B, 1, H, W) float32, and with ``return_perm`` a (B, k*k) int64 CPU tensor ``perm``
        where output tile j (tiles numbered row-major) is input tile ``perm[b, j]``.

    Raises:
        ConfigError: k does not divide H and W (the message lists the valid k).
    """
    x = as_float_batch(x)
    k = _check_k(x, k, "part_shuffle")
    _check_generator(generator, "part_shuffle")
    perm = random_derangements(x.shape[0], k * k, generator)
    out = _apply_tile_perm(x, k, perm)
    return (out, perm) if return_perm else out


def tile_swap(
    x: Tensor, k: int, generator: torch.Generator, *, return_perm: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Exchange exactly two distinct, randomly chosen tiles of a k x k grid in each image.

    The pair is uniform over all unordered pairs of distinct tiles, independently per image.

    Args:
        x: (B, 1, H, W) batch (see :func:`as_float_batch`).
        k: tiles per side; must divide both H and W and be >= 2.
        generator: CPU generator.
        return_perm: also return the permutation (as in :func:`part_shuffle`).

    Returns:
        (B, 1, H, W) float32, and with ``return_perm`` the (B, k*k) permutation.
    """
    x = as_float_batch(x)
    k = _check_k(x, k, "tile_swap")
    if k < 2:
        raise ConfigError("tile_swap: k must be >= 2 (a 1x1 grid has no two tiles to swap)")
    _check_generator(generator, "tile_swap")
    b, n = x.shape[0], k * k
    i = torch.randint(0, n, (b,), generator=generator)
    # j uniform over the n - 1 tiles other than i: draw from n - 1 values and skip i.
    j = torch.randint(0, n - 1, (b,), generator=generator)
    j = j + (j >= i).to(j.dtype)
    perm = torch.arange(n).repeat(b, 1)  # (B, n) identity rows
    rows = torch.arange(b)
    perm[rows, i] = j
    perm[rows, j] = i
    out = _apply_tile_perm(x, k, perm)
    return (out, perm) if return_perm else out
