"""Tests for capsbench.data.transforms on synthetic digit-like images (no dataset needed)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capsbench.data import mnistc
from capsbench.data import transforms as T
from capsbench.errors import ConfigError

FAST = settings(max_examples=25, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def digits(n: int = 8, seed: int = 0, size: int = 28) -> torch.Tensor:
    """Digit-like images: two Gaussian strokes inside the central 20x20 box, exact-zero ground.

    Returns (n, 1, size, size) float32 in [0, 1].
    """
    g = gen(seed)
    lo, hi = size / 2 - 8, size / 2 + 7  # stroke ends stay in MNIST's 20x20 ink box
    ends = lo + (hi - lo) * torch.rand((n, 2, 2, 2), generator=g)  # (n, stroke, end, xy)
    s = torch.linspace(0, 1, 12)  # points along each stroke
    pts = ends[:, :, :1] + s[None, None, :, None] * (ends[:, :, 1:] - ends[:, :, :1])
    pts = pts.reshape(n, -1, 2)  # (n, P, 2) stroke points as (x, y)
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        indexing="ij",
    )
    d2 = (xx[None, None] - pts[..., 0, None, None]) ** 2 + (
        yy[None, None] - pts[..., 1, None, None]
    ) ** 2
    img = torch.exp(-d2 / 2.0).amax(dim=1)  # (n, size, size)
    img = torch.where(img > 0.05, img, torch.zeros(()))  # real zeros outside the ink
    return img.unsqueeze(1)


def blob(cx: float, cy: float, size: int = 28, sigma: float = 1.5) -> torch.Tensor:
    """One smooth Gaussian blob at pixel (cx, cy) = (column, row), shape (1, 1, size, size)."""
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float64),
        torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    img = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return img.float()[None, None]


def com(x: torch.Tensor) -> torch.Tensor:
    """Centre of mass of each image as (B, 2) (x = column, y = row), float64."""
    x = x[:, 0].double()
    h, w = x.shape[-2:]
    mass = x.sum(dim=(1, 2))
    cx = (x.sum(dim=1) * torch.arange(w, dtype=torch.float64)).sum(1) / mass
    cy = (x.sum(dim=2) * torch.arange(h, dtype=torch.float64)).sum(1) / mass
    return torch.stack([cx, cy], -1)


def tiles_of(x: torch.Tensor, k: int) -> torch.Tensor:
    b, _, h, w = x.shape
    t = x.reshape(b, k, h // k, k, w // k)  # (B, tile_row, th, tile_col, tw)
    return t.permute(0, 1, 3, 2, 4).reshape(b, k * k, h // k, w // k)  # (B, k*k, th, tw)


# --------------------------------------------------------------------------- input handling


def test_as_float_batch_accepts_uint8_and_3d():
    u8 = torch.randint(0, 256, (3, 28, 28), generator=gen(), dtype=torch.uint8)
    out = T.as_float_batch(u8)
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], u8.float() / 255)
    torch.testing.assert_close(T.as_float_batch(u8[:, None]), out)
    assert T.as_float_batch(torch.rand(2, 1, 5, 7, dtype=torch.float64)).dtype == torch.float32
    # uint8 works through the transforms too
    assert T.rotate(u8, 10.0).shape == (3, 1, 28, 28)


ALL_FUNCTIONS = {
    "rotate": lambda x: T.rotate(x, 10.0),
    "affine": lambda x: T.affine(x, angle_deg=5.0),
    "shift": lambda x: T.shift(x, 1, 1),
    "random_shift": lambda x: T.random_shift(x, 2, gen()),
    "place_on_canvas": lambda x: T.place_on_canvas(x, 40),
    "random_place": lambda x: T.random_place(x, 40, gen()),
    "jitter_on_canvas": lambda x: T.jitter_on_canvas(x, 40, 2, gen()),
    "part_shuffle": lambda x: T.part_shuffle(x, 2, gen()),
    "tile_swap": lambda x: T.tile_swap(x, 2, gen()),
    "affnist_like": lambda x: T.affnist_like(x, gen()),
    "mnistc_shear": lambda x: mnistc.mnistc_shear(x, generator=gen()),
    "mnistc_rotate": lambda x: mnistc.mnistc_rotate(x, generator=gen()),
    "mnistc_scale": lambda x: mnistc.mnistc_scale(x),
    "mnistc_translate": lambda x: mnistc.mnistc_translate(x, generator=gen()),
}


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(28, 28),  # no batch dimension
        torch.zeros(2, 3, 28, 28),  # three channels
        torch.zeros(2, 1, 1, 28, 28),  # 5-d
        torch.zeros(2, 1, 28, 28, dtype=torch.int64),  # ambiguous integer scale
    ],
    ids=["2d", "rgb", "5d", "int64"],
)
def test_every_function_rejects_bad_input(name, bad):
    with pytest.raises(ValueError, match=r"shape|dtype"):
        ALL_FUNCTIONS[name](bad)


@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_every_function_keeps_float32_device_and_batch(name):
    x = digits(5)
    out = ALL_FUNCTIONS[name](x)
    assert out.dtype == torch.float32 and out.device == x.device
    assert out.shape[:2] == (5, 1)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6


def test_non_tensor_and_wrong_generator_are_type_errors():
    with pytest.raises(TypeError):
        T.rotate(np.zeros((1, 28, 28)), 3.0)
    with pytest.raises(TypeError, match="Generator"):
        T.random_shift(digits(2), 2, 0)
    with pytest.raises(TypeError, match="Generator"):
        mnistc.mnistc_rotate(digits(2))


# --------------------------------------------------------------------------- rotate / affine


@FAST
@given(turns=st.integers(-2, 2))
def test_rotate_by_full_turns_is_identity(turns):
    x = digits(4)
    torch.testing.assert_close(T.rotate(x, 360.0 * turns), x, atol=1e-4, rtol=0)


def test_rotate_zero_is_identity():
    x = digits(4)
    torch.testing.assert_close(T.rotate(x, 0.0), x, atol=1e-5, rtol=0)


def test_rotate_quarter_turns_match_rot90_counter_clockwise():
    x = digits(4)
    angles = torch.tensor([90.0, 180.0, 270.0, -90.0])
    out = T.rotate(x, angles)
    for i, k in enumerate([1, 2, 3, -1]):
        torch.testing.assert_close(out[i], torch.rot90(x[i], k, dims=(-2, -1)), atol=1e-4, rtol=0)


def test_rotate_non_square_half_turn_is_double_flip():
    x = torch.rand(3, 1, 12, 19, generator=gen())
    torch.testing.assert_close(T.rotate(x, 180.0), x.flip(-1, -2), atol=1e-4, rtol=0)


@FAST
@given(angle=st.floats(-180, 180))
def test_rotate_moves_centre_of_mass_along_the_rotation(angle):
    x = blob(19.0, 10.0)  # offset (5.5, -3.5) from the centre (13.5, 13.5)
    got = com(T.rotate(x, angle))[0] - 13.5
    a = math.radians(angle)
    # counter-clockwise on screen with y down
    want = torch.tensor(
        [math.cos(a) * 5.5 + math.sin(a) * -3.5, -math.sin(a) * 5.5 + math.cos(a) * -3.5],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


@FAST
@given(dx=st.integers(-4, 4), dy=st.integers(-4, 4))
def test_affine_integer_translation_equals_shift(dx, dy):
    x = digits(3)
    torch.testing.assert_close(
        T.affine(x, translate_px=(dx, dy)), T.shift(x, dx, dy), atol=1e-5, rtol=0
    )


def test_affine_onto_a_larger_non_square_canvas_is_centred_padding():
    x = digits(3)
    out = T.affine(x, out_size=(36, 44))
    want = torch.nn.functional.pad(x, (8, 8, 4, 4))  # (left, right, top, bottom)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        T.affine(x, out_size=40), T.place_on_canvas(x, 40), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "matrix"),
    [
        ({"scale": 1.5}, [[1.5, 0.0], [0.0, 1.5]]),
        ({"scale": (1.3, 0.8)}, [[1.3, 0.0], [0.0, 0.8]]),
        ({"shear": 0.3}, [[1.0, 0.3], [0.0, 1.0]]),
        ({"shear": (0.0, -0.2)}, [[1.0, 0.0], [-0.2, 1.0]]),
    ],
)
def test_affine_moves_centre_of_mass_linearly(kwargs, matrix):
    x = blob(17.0, 9.0)  # offset (3.5, -4.5) from the centre
    got = com(T.affine(x, **kwargs))[0] - 13.5
    want = torch.tensor(matrix, dtype=torch.float64) @ torch.tensor(
        [3.5, -4.5], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


def test_affine_composes_scale_shear_rotation_then_translation():
    x = blob(17.0, 9.0, size=40)  # offset (-2.5, -10.5) from the centre (19.5, 19.5)
    out = T.affine(x, angle_deg=30.0, shear=0.2, scale=(1.1, 0.9), translate_px=(2.0, -1.0))
    a = math.radians(30.0)
    rot = torch.tensor(
        [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=torch.float64
    )
    sh = torch.tensor([[1.0, 0.2], [0.0, 1.0]], dtype=torch.float64)
    sc = torch.diag(torch.tensor([1.1, 0.9], dtype=torch.float64))
    p = torch.tensor([-2.5, -10.5], dtype=torch.float64)
    want = rot @ sh @ sc @ p + torch.tensor([2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(com(out)[0] - 19.5, want, atol=0.05, rtol=0)


def test_affine_rejects_bad_arguments():
    x = digits(2)
    with pytest.raises(ConfigError, match="singular"):
        T.affine(x, scale=0.0)
    with pytest.raises(ConfigError, match="mode"):
        T.affine(x, angle_deg=3.0, mode="lanczos")
    with pytest.raises(ConfigError, match="out_size"):
        T.affine(x, out_size=(0, 28))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        T.rotate(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="pair"):
        T.affine(x, scale=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------- integer shifts


@FAST
@given(dx=st.integers(-4, 4), dy=st.integers(-4, 4))
def test_shift_moves_centre_of_mass_exactly(dx, dy):
    x = digits(4)  # ink stays >= 4 px from every border
    out = T.shift(x, dx, dy)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(
        com(out) - com(x), torch.tensor([[dx, dy]] * 4, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_shift_per_image_and_out_of_range():
    x = digits(3)
    dx, dy = torch.tensor([1, -2, 0]), torch.tensor([0, 3, -1])
    out = T.shift(x, dx, dy)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], T.shift(x[i : i + 1], int(dx[i]), int(dy[i])))
    assert torch.equal(T.shift(x, 28, 0), torch.zeros_like(x))
    assert torch.equal(T.shift(x, 0, -40), torch.zeros_like(x))
    with pytest.raises(ValueError, match="integer"):
        T.shift(x, 0.5, 0)


def test_random_shift_is_bounded_and_covers_the_range():
    x = digits(1).expand(64, 1, 28, 28)
    out = T.random_shift(x, 2, gen(3))
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    d = com(out) - com(x)
    torch.testing.assert_close(d, d.round(), atol=1e-9, rtol=0)
    d = d.round()
    assert d.abs().max() <= 2
    assert set(d[:, 0].round().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert set(d[:, 1].round().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    torch.testing.assert_close(T.random_shift(x, 0, gen()), x)
    with pytest.raises(ConfigError, match="max_shift"):
        T.random_shift(x, -1, gen())


def test_place_on_canvas_shape_and_centre_of_mass():
    x = digits(3)
    out = T.place_on_canvas(x, 40)
    assert out.shape == (3, 1, 40, 40)
    torch.testing.assert_close(com(out), com(x) + 6, atol=1e-9, rtol=0)
    moved = T.place_on_canvas(x, 40, torch.tensor([-6, 0, 6]), 3)
    want = com(x) + 6 + torch.tensor([[-6, 3], [0, 3], [6, 3]], dtype=torch.float64)
    torch.testing.assert_close(com(moved), want, atol=1e-9, rtol=0)
    with pytest.raises(ConfigError, match="canvas"):
        T.place_on_canvas(x, 20)


def test_random_place_keeps_the_whole_box_inside():
    x = torch.rand(200, 1, 28, 28, generator=gen()) * 0.5 + 0.5  # ink everywhere, also on borders
    out = T.random_place(x, 40, gen(1))
    assert out.shape == (200, 1, 40, 40)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    rows = (out[:, 0] > 0).any(dim=2).float().argmax(dim=1)  # top row of the box
    cols = (out[:, 0] > 0).any(dim=1).float().argmax(dim=1)
    assert set(rows.tolist()) == set(range(13)) and set(cols.tolist()) == set(range(13))


def test_jitter_on_canvas_is_bounded():
    x = digits(50)
    out = T.jitter_on_canvas(x, 40, 3, gen(2))
    d = com(out) - (com(x) + 6)
    torch.testing.assert_close(d, d.round(), atol=1e-9, rtol=0)
    d = d.round()
    assert d.abs().max() == 3 and set(d.flatten().tolist()) == set(range(-3, 4))


# --------------------------------------------------------------------------- tiles


@FAST
@given(k=st.sampled_from([2, 4, 7, 14, 28]), seed=st.integers(0, 2**31 - 1))
def test_part_shuffle_is_a_derangement_of_the_tiles(k, seed):
    x = torch.rand(6, 1, 28, 28, generator=gen(seed))  # all tiles distinct
    out, perm = T.part_shuffle(x, k, gen(seed), return_perm=True)
    assert perm.shape == (6, k * k)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(k * k).expand(6, -1))
    assert not (perm == torch.arange(k * k)).any()  # no tile stays in place
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    want = tiles_of(x, k)[torch.arange(6)[:, None], perm]
    assert torch.equal(tiles_of(out, k), want)


def test_part_shuffle_k1_is_identity_and_bad_k_lists_valid_values():
    x = digits(2)
    assert torch.equal(T.part_shuffle(x, 1, gen()), x)
    with pytest.raises(ConfigError, match=r"k=3.*1, 2, 4, 7, 14, 28"):
        T.part_shuffle(x, 3, gen())
    with pytest.raises(ConfigError, match=r"k=4.*1, 2, 3, 6"):
        T.part_shuffle(torch.rand(2, 1, 12, 18), 4, gen())
    assert T.part_shuffle(torch.rand(2, 1, 12, 18), 3, gen()).shape == (2, 1, 12, 18)


def test_derangements_are_uniform():
    perms = T.random_derangements(9000, 4, gen(5))
    counts = Counter(map(tuple, perms.tolist()))
    assert len(counts) == 9  # !4 = 9 derangements of 4 tiles
    assert all(700 < c < 1300 for c in counts.values())


@FAST
@given(k=st.sampled_from([2, 4, 7]), seed=st.integers(0, 2**31 - 1))
def test_tile_swap_changes_exactly_two_tiles(k, seed):
    x = torch.rand(8, 1, 28, 28, generator=gen(seed))
    out, perm = T.tile_swap(x, k, gen(seed), return_perm=True)
    before, after = tiles_of(x, k), tiles_of(out, k)
    changed = (before != after).flatten(2).any(dim=2)  # (B, k*k)
    assert torch.equal(changed.sum(dim=1), torch.full((8,), 2))
    for b in range(8):
        i, j = changed[b].nonzero().squeeze(1).tolist()
        assert torch.equal(after[b, i], before[b, j]) and torch.equal(after[b, j], before[b, i])
        assert perm[b, i] == j and perm[b, j] == i


def test_tile_swap_needs_two_tiles():
    with pytest.raises(ConfigError, match="k"):
        T.tile_swap(digits(2), 1, gen())
    with pytest.raises(ConfigError, match="valid k"):
        T.tile_swap(digits(2), 5, gen())


# --------------------------------------------------------------------------- seeding

RANDOM_FUNCTIONS = {
    "random_shift": lambda x, g: T.random_shift(x, 2, g),
    "random_place": lambda x, g: T.random_place(x, 40, g),
    "jitter_on_canvas": lambda x, g: T.jitter_on_canvas(x, 40, 4, g),
    "part_shuffle": lambda x, g: T.part_shuffle(x, 4, g),
    "tile_swap": lambda x, g: T.tile_swap(x, 4, g),
    "affnist_like": lambda x, g: T.affnist_like(x, g),
    "mnistc_shear": lambda x, g: mnistc.mnistc_shear(x, 2, g),
    "mnistc_rotate": lambda x, g: mnistc.mnistc_rotate(x, 2, g),
    "mnistc_translate": lambda x, g: mnistc.mnistc_translate(x, 3, g),
}


@pytest.mark.parametrize("name", sorted(RANDOM_FUNCTIONS))
def test_same_seed_same_output_different_seed_different_output(name):
    fn = RANDOM_FUNCTIONS[name]
    x = digits(16)
    assert torch.equal(fn(x, gen(7)), fn(x, gen(7)))
    assert not torch.equal(fn(x, gen(7)), fn(x, gen(8)))


# --------------------------------------------------------------------------- affNIST-like


def test_random_affine_params_ranges():
    p = T.random_affine_params(500, gen())
    assert set(p) == {"angle_deg", "shear", "scale_x", "scale_y"}
    assert all(v.shape == (500,) for v in p.values())
    assert p["angle_deg"].abs().max() <= 20 and p["angle_deg"].abs().max() > 19
    assert p["shear"].abs().max() <= 0.2
    for key in ("scale_x", "scale_y"):
        assert 0.8 <= p[key].min() and p[key].max() <= 1.2
    with pytest.raises(ConfigError):
        T.random_affine_params(3, gen(), scale_range=(1.2, 0.8))


def test_affnist_like_keeps_all_ink_inside_the_canvas():
    x = digits(32, seed=4)
    out, p = T.affnist_like(x, gen(9), return_params=True)
    assert out.shape == (32, 1, 40, 40) and out.dtype == torch.float32
    kwargs = {
        "angle_deg": p["angle_deg"],
        "shear": p["shear"],
        "scale": (p["scale_x"], p["scale_y"]),
    }
    # Nothing is lost: the same affine on a huge canvas has the same total ink.
    huge = T.affine(x, **kwargs, out_size=100)
    torch.testing.assert_close(
        out.sum(dim=(1, 2, 3)), huge.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4
    )
    # The output is exactly that affine followed by the reported integer shift.
    same = T.affine(x, **kwargs, translate_px=(p["dx"], p["dy"]), out_size=40)
    torch.testing.assert_close(out, same, atol=1e-4, rtol=0)
    # Placement is random, and far from always central.
    assert p["dx"].abs().max() >= 5 and p["dy"].abs().max() >= 5


def test_affnist_like_rejects_small_canvas():
    with pytest.raises(ConfigError, match="canvas"):
        T.affnist_like(digits(2), gen(), canvas=20)


# --------------------------------------------------------------------------- MNIST-C


def skimage_like_warp(img: np.ndarray, m: np.ndarray, t: np.ndarray) -> np.ndarray:
    """What MNIST-C's ``transform.warp(img, inverse_map=aff)`` computes, written out in numpy.

    ``(col, row)_in = m @ (col, row)_out + t``, bilinear, zero outside the image.
    """
    h, w = img.shape
    rows, cols = np.mgrid[0:h, 0:w]
    src = m @ np.stack([cols.ravel(), rows.ravel()]).astype(np.float64) + t[:, None]
    c, r = src
    c0, r0 = np.floor(c).astype(int), np.floor(r).astype(int)
    fc, fr = c - c0, r - r0

    def at(rr, cc):
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        return np.where(ok, img[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)], 0.0)

    out = (
        (1 - fr) * (1 - fc) * at(r0, c0)
        + (1 - fr) * fc * at(r0, c0 + 1)
        + fr * (1 - fc) * at(r0 + 1, c0)
        + fr * fc * at(r0 + 1, c0 + 1)
    )
    return out.reshape(h, w)


def mnistc_maps(name: str, severity: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """MNIST-C's candidate output-to-input maps (one per random sign choice)."""

    def about_centre(m):
        return m, 13.5 * (1 - m.sum(axis=1))  # keeps (13.5, 13.5) fixed, as MNIST-C does

    if name == "shear":
        c = [0.2, 0.4, 0.6, 0.8, 1.0][severity - 1]
        return [about_centre(np.array([[1, -np.sin(s * c)], [0, np.cos(s * c)]])) for s in (-1, 1)]
    if name == "rotate":
        c = [0.2, 0.4, 0.6, 0.8, 1.0][severity - 1]
        return [
            about_centre(
                np.array([[np.cos(s * c), -np.sin(s * c)], [np.sin(s * c), np.cos(s * c)]])
            )
            for s in (-1, 1)
        ]
    if name == "scale":
        c = [0.9, 0.8, 0.7, 0.6, 0.5][severity - 1]
        return [about_centre(np.eye(2) / c)]
    c = [1, 2, 3, 4, 5][severity - 1]
    return [(np.eye(2), np.array([sx * c, sy * c], float)) for sx in (-1, 1) for sy in (-1, 1)]


@pytest.mark.parametrize("name", ["shear", "rotate", "scale", "translate"])
@pytest.mark.parametrize("severity", [None, 5])
def test_mnistc_matches_the_reference_warp(name, severity):
    sev = mnistc.MNISTC_DEFAULT_SEVERITY[name] if severity is None else severity
    x = digits(8, seed=11)
    out = mnistc.MNISTC_AFFINE[name](x, sev, gen(1)).numpy()
    seen = set()
    for b in range(8):
        errs = [
            np.abs(out[b, 0] - skimage_like_warp(x[b, 0].double().numpy(), m, t)).max()
            for m, t in mnistc_maps(name, sev)
        ]
        assert min(errs) < 1e-4, (name, b, errs)
        seen.add(int(np.argmin(errs)))
    if name != "scale":
        assert len(seen) > 1  # the random sign really varies


def test_mnistc_defaults_and_severity_check():
    assert mnistc.MNISTC_DEFAULT_SEVERITY == {"shear": 2, "rotate": 2, "scale": 3, "translate": 3}
    x = digits(2)
    torch.testing.assert_close(mnistc.mnistc_scale(x), T.affine(x, scale=0.7))
    for fn in mnistc.MNISTC_AFFINE.values():
        with pytest.raises(ConfigError, match="severity"):
            fn(x, 6, gen())


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(ALL_FUNCTIONS))
def test_cuda_matches_cpu(name):
    x = digits(16)
    cpu = ALL_FUNCTIONS[name](x)
    gpu = ALL_FUNCTIONS[name](x.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
