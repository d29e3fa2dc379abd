"""find_defects: the defects of a batch of tiles at once, equal bit for bit to the per-tile search."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import strict_warnings
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.defects import (
    _sky,
    find_defects,
    row_medians,
    saturation_plateau,
    sky_statistics,
    spikes,
    tile_skies,
)
from pipeline.errors import InputError
from pipeline.sim.defects import add_defects
from pipeline.sim.scenes import gaussian_kernel, survey_tile_pair


def per_tile(images, usable, others, others_usable) -> np.ndarray:
    """The reference: the per-tile functions, tile by tile."""
    found = np.zeros(np.shape(images), dtype=bool)
    for i in range(len(images)):
        u = np.ones(images[i].shape, dtype=bool) if usable is None else usable[i]
        other = None if others is None else others[i]
        ou = None if others_usable is None else others_usable[i]
        with np.errstate(all="ignore"):
            found[i] = saturation_plateau(images[i], u) | spikes(images[i], u, other, ou)
    return found


def check(images, usable=None, others=None, others_usable=None) -> np.ndarray:
    """find_defects equals the reference and leaves its inputs as they were; returns its result."""
    given = [None if a is None else a.copy() for a in (images, usable, others, others_usable)]
    got = find_defects(images, usable, others, others_usable)
    assert got.dtype == bool and got.shape == np.shape(images)
    np.testing.assert_array_equal(got, per_tile(images, usable, others, others_usable))
    if np.asarray(images).dtype in (np.float32, np.float64):  # the sky measured beforehand: the same search
        with np.errstate(invalid="ignore"):
            skies = tile_skies(np.asarray(images), usable)
        np.testing.assert_array_equal(find_defects(images, usable, others, others_usable, skies=skies), got)
    for before, after in zip(given, (images, usable, others, others_usable), strict=True):
        if before is not None:
            np.testing.assert_array_equal(before, after)
    return got


def scene(rng: np.random.Generator, n: int, ny: int, nx: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A pair of batches: sky, noise and stars (some undersampled) in both, the other through a
    wider PSF; hot and dead pixels, cosmic rays and saturated plateaus in either."""
    y, x = np.indices((ny, nx))
    pair = []
    for _ in range(2):
        images = rng.normal(0.0, 1.0, (n, ny, nx)) * rng.uniform(1.0, 20.0, (n, 1, 1))
        images += rng.uniform(-100.0, 1000.0, (n, 1, 1))
        pair.append(images)
    for i in range(n):
        for _ in range(rng.integers(0, 6)):
            cy, cx = rng.uniform(-2, ny + 2), rng.uniform(-2, nx + 2)
            width = rng.uniform(0.4, 2.5)
            flux = 10 ** rng.uniform(1.5, 5.0)
            for images, widen in zip(pair, (1.0, 1.6), strict=True):
                w = width * widen
                images[i] += flux / w**2 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * w * w))
    for images in pair:
        for i in range(n):
            k = rng.integers(0, 8)  # hot and dead pixels, cosmic-ray hits
            images[i, rng.integers(0, ny, k), rng.integers(0, nx, k)] += (
                rng.choice([-1.0, 1.0], k) * 10 ** rng.uniform(1.5, 4.5, k))
            if rng.random() < 0.3:  # a saturated core
                level = np.quantile(images[i], rng.uniform(0.9, 1.0))
                images[i] = np.minimum(images[i], level)
            if rng.random() < 0.15:  # a plateau of an exact value at the top
                cy, cx = rng.integers(0, ny - 1), rng.integers(0, nx - 2)
                images[i, cy : cy + 2, cx : cx + rng.integers(1, 3)] = images[i].max() * (1 + rng.uniform(0, 1e-6))
            if rng.random() < 0.1:  # integer-valued, ties everywhere
                images[i] = np.round(images[i] / rng.uniform(1.0, 50.0))
            if rng.random() < 0.05:  # flat
                images[i] = rng.uniform(-10.0, 10.0)
            if rng.random() < 0.05:  # a photo: sharp detail everywhere
                images[i] += rng.choice([0.0, 1e3], (ny, nx), p=[0.9, 0.1])
    return pair[0].astype(dtype), pair[1].astype(dtype)


def mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray | None:
    """None, or usable pixels with random holes, whole masked rows (the rows of the sky statistics
    too) and a tile with nothing usable."""
    kind = rng.integers(0, 5)
    if kind == 0:
        return None
    n, ny, _ = shape
    usable = rng.random(shape) >= rng.choice([0.0, 0.002, 0.05, 0.3, 0.9])
    if kind == 2:
        usable[rng.integers(0, n), rng.integers(0, ny, rng.integers(1, 4))] = False
    if kind == 3:
        usable[rng.integers(0, n), :: max(1, ny // 16)] = False  # every row of the sky statistics
    if kind == 4:
        usable[rng.integers(0, n)] = False
    return usable


@settings(max_examples=200)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), ny=st.integers(8, 64), nx=st.integers(8, 64),
       dtype=st.sampled_from([np.float32, np.float64]), other_dtype=st.sampled_from(["same", "other"]),
       others_given=st.sampled_from([True, True, True, False]), nan_unusable=st.booleans())
def test_find_defects_is_the_per_tile_search(seed, n, ny, nx, dtype, other_dtype, others_given, nan_unusable):
    rng = np.random.default_rng(seed)
    images, others = scene(rng, n, ny, nx, dtype)
    if other_dtype == "other":
        others = others.astype(np.float64 if dtype == np.float32 else np.float32)
    usable, others_usable = mask(rng, images.shape), mask(rng, images.shape)
    if nan_unusable:  # bad pixels are NaN in the data: never read where unusable
        if usable is not None:
            images[~usable] = np.nan
        if others_usable is not None:
            others[~others_usable] = np.nan
    check(images, usable, others if others_given else None, others_usable if others_given else None)
    check(others, others_usable, images, usable)  # the roles exchanged, as the Welch estimator does


def nudged(value: float, steps: int, dtype) -> object:
    """``value`` in ``dtype``, moved by ``steps`` units in the last place."""
    v = np.asarray(value).astype(dtype)
    for _ in range(abs(steps)):
        v = np.nextafter(v, dtype(np.inf if steps > 0 else -np.inf))
    return v


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       other_dtype=st.sampled_from([np.float32, np.float64]), masked=st.booleans())
def test_decisions_on_their_knife_edges(seed, dtype, other_dtype, masked):
    """Spikes, counterparts and plateaus a few units in the last place from every threshold of the
    per-tile search: each comparison must be made as it makes it (dtype, rounding, order)."""
    rng = np.random.default_rng(seed)
    n, size = 2, 64  # sky statistics from rows 0, 4, 8, ...: the pixels set below are in none of them
    images = (rng.normal(0.0, rng.uniform(0.5, 10.0), (n, size, size)) + rng.uniform(-50, 500)).astype(dtype)
    others = (rng.normal(0.0, rng.uniform(0.5, 10.0), (n, size, size)) + rng.uniform(-50, 500)).astype(other_dtype)
    usable = rng.random(images.shape) > 0.02 if masked else np.ones(images.shape, dtype=bool)
    others_usable = rng.random(images.shape) > 0.02 if masked else None
    for i in range(n):
        level, sigma, _ = _sky(images[i], usable[i])
        o_level, o_sigma, _ = _sky(others[i], np.ones(images.shape[1:], dtype=bool) if others_usable is None
                                   else others_usable[i])
        threshold = 10.0 * sigma
        spots = [(y, x) for y in range(6, size - 4, 4) for x in range(4, size - 4, 5)]
        for k in rng.choice(len(spots), 12, replace=False):
            y, x = spots[k]
            usable[i, y, x] = True
            kind = rng.integers(0, 3)
            if kind == 2:  # neighbours lit to a quarter of the pixel's height: the sharpness rule
                box = images[i, y - 1 : y + 2, x - 1 : x + 2]
                box[...] = level + rng.uniform(0.4, 0.6) * threshold + rng.normal(0.0, 0.1 * sigma, (3, 3))
                usable[i, y - 1 : y + 2, x - 1 : x + 2] = True
            around = np.sort(np.delete(np.where(usable[i], images[i], level)[y - 1 : y + 2, x - 1 : x + 2], 4))
            high = kind != 1
            if kind == 2:
                edge = level + 4.0 * (float(around[4]) - level)
            elif high:  # the 3x3 median is the 5th of the neighbours when the pixel is the highest
                edge = max(level + threshold, float(around[4]) + threshold)
            else:
                edge = min(level - threshold, float(around[3]) - threshold)
            value = nudged(edge, int(rng.integers(-2, 3)), dtype)
            images[i, y, x] = value
            if high and rng.random() < 0.5:  # light in the other image, just at its threshold
                lit = max(5.0 * o_sigma, 0.02 * abs(float(value) - level))
                others[i, y - 1 : y + 2, x - 1 : x + 2] = nudged(o_level + lit, int(rng.integers(-2, 3)), other_dtype)
                if others_usable is not None:
                    others_usable[i, y - 1 : y + 2, x - 1 : x + 2] = True
        if rng.random() < 0.5:  # a plateau whose members are within units in the last place of its level
            top = float(images[i].max()) + 100 * sigma
            y, x = 30, int(rng.integers(2, size - 5))
            images[i, y, x] = top
            edge = float(np.asarray(top).astype(dtype)) * (1 - 1e-6)
            images[i, y, x + 1 : x + 3] = [nudged(edge, int(rng.integers(-2, 3)), dtype) for _ in range(2)]
            usable[i, y, x : x + 3] = True
    usable = usable if masked else None
    check(images, usable, others, others_usable)
    check(others, others_usable, images, usable)


def spiky_batch(rng: np.random.Generator, n: int = 3, size: int = 48) -> np.ndarray:
    images = rng.normal(100.0, 5.0, (n, size, size))
    images[:, 10, 20] += 2e3  # a hot pixel in every tile
    images[:, 30, 7] -= 500.0  # a dead one
    return images


def test_a_photo_tile_reports_nothing_and_the_others_still_report():
    rng = np.random.default_rng(3)
    images = spiky_batch(rng)
    photo = rng.random(images.shape[1:]) < 0.05
    images[1][photo] += 3e3  # many sharp features: not point sources on a sky
    found = check(images)
    assert not found[1].any()
    for i in (0, 2):
        assert {tuple(p) for p in np.argwhere(found[i])} == {(10, 20), (30, 7)}
    found = check(images, np.ones(images.shape, dtype=bool), images[::-1].copy(), None)
    assert not found[1].any() and found[0].sum() == found[2].sum() == 2


def test_flat_and_tiny_tiles():
    rng = np.random.default_rng(4)
    images = spiky_batch(rng)
    images[1] = 7.0  # flat: no noise to measure, no plateau (every pixel at the top)
    found = check(images)
    assert not found[1].any() and found[0].any() and found[2].any()
    for shape in ((2, 2, 9), (2, 9, 2), (1, 1, 1), (3, 2, 2)):
        tiny = rng.normal(size=shape)
        tiny[0, 0, 0] += 1e4
        assert not check(tiny).any()  # no 3x3 neighbourhood: no spike; too few pixels for a plateau
        check(tiny, rng.random(shape) > 0.3, tiny[::-1].copy())
    tiny = np.zeros((1, 2, 12))
    tiny[0, 0, 2:5] = tiny[0, 1, 2:5] = 5.0  # a plateau of 6 pixels in 24: found without spikes
    assert check(tiny).sum() == 6
    assert find_defects(np.zeros((0, 5, 5)), None, None, None).shape == (0, 5, 5)


def test_plateaus():
    rng = np.random.default_rng(5)
    images = rng.normal(0.0, 1.0, (4, 32, 32))
    images[0, 5:7, 8:10] = 50.0  # saturated core
    images[1, [3, 9, 20, 12, 13], [4, 14, 25, 31, 0]] = 50.0  # equal maxima that do not touch: spikes
    images[2, 5:7, 8:10] = 50.0
    images[3, 5:7, 8:10] = 50.0
    usable = np.ones(images.shape, dtype=bool)
    usable[2, 5, 8:10] = False  # two left: too few
    usable[3, 20, 20] = False
    images[3, 20, 20] = np.nan  # unusable NaN: harmless
    found = check(images, usable)
    assert found[0].sum() == 4 and not found[2].any() and found[3].sum() == 4
    assert {tuple(p) for p in np.argwhere(found[1])} == {(3, 4), (9, 14), (20, 25)}
    images[3, 25, 25] = np.nan  # a usable NaN: the tile's maximum is NaN, no plateau (as per tile)
    found = check(images, usable)
    assert found[0].sum() == 4 and not found[3].any()
    check(images, usable, images[::-1].copy(), usable[::-1].copy())


@pytest.mark.parametrize("masked", [False, True])
def test_a_plateau_across_the_spike_threshold(masked):
    """Plateau pixels both sides of the level 10 sigmas above the sky (the candidates' threshold)."""
    rng = np.random.default_rng(9)
    images = rng.normal(1e4, 1.0, (2, 32, 32))
    usable = rng.random(images.shape) > 0.01
    usable[:, 9, 9:12] = True
    level, sigma, _ = _sky(images[0], usable[0] if masked else np.ones((32, 32), dtype=bool))
    edge = level + 10.0 * sigma
    images[:, 9, 9:12] = [edge + 0.004, edge - 0.004, edge - 0.006]  # within 1e-6 of the top
    found = check(images, usable if masked else None)
    assert found[0, 9, 9:12].all()


def test_unusable_rows_of_statistics_and_nan_in_them():
    rng = np.random.default_rng(6)
    images = spiky_batch(rng, size=40)
    usable = np.ones(images.shape, dtype=bool)
    images[0, 11, 21] += 2e3
    usable[0, ::2] = False  # every row of the sky statistics (and two defects): statistics from all rows
    usable[1, ::2, ::3] = False  # ragged rows
    found = check(images, usable)
    assert np.argwhere(found[0]).tolist() == [[11, 21]] and found[1:].sum() == 4
    images[2, 0, 5] = np.nan  # a usable NaN in the statistics: as the per-tile search does
    check(images, usable)
    check(images, usable, images[::-1].copy(), usable[::-1].copy())
    odd = spiky_batch(rng, size=41)  # an odd number of values in the statistics
    odd[1, 0, 5] = np.nan
    assert not check(odd)[1].any() and not check(odd, np.ones(odd.shape, dtype=bool))[1].any()


def test_the_other_image_with_its_rows_of_statistics_unusable():
    """The other image's sky from all its rows, as the per-tile search takes it: its light there
    makes a hot pixel a star seen in both images."""
    rng = np.random.default_rng(10)
    images = spiky_batch(rng, size=40)
    others = rng.normal(100.0, 5.0, images.shape)
    others[:, 9:12, 19:22] += 300.0  # light around (10, 20)
    others_usable = np.ones(images.shape, dtype=bool)
    others_usable[1, ::2] = False
    others[2, ::2] = 100.0  # no noise measured: no light seen, the hot pixel stays one
    found = check(images, None, others, others_usable)
    assert not found[:2, 10, 20].any() and found[2, 10, 20] and found[:, 30, 7].all()


def test_a_sky_without_noise_has_no_spikes():
    rng = np.random.default_rng(11)
    images = spiky_batch(rng, size=40)
    images[1, ::2] = 100.0  # the rows of the statistics (every other one) flat: no noise measured
    found = check(images)
    assert not found[1].any() and found[0].any()


def test_integer_images_are_judged_tile_by_tile():
    rng = np.random.default_rng(7)
    images = np.round(spiky_batch(rng)).astype(np.int32)
    assert check(images, None, images[::-1].copy()).sum() == 6


def test_survey_tiles():
    """Simulated survey tiles with real defects: hot and dead pixels, cosmic rays, saturation."""
    rng = np.random.default_rng(8)
    kernel = gaussian_kernel(11, fwhm=2.5)
    sources, targets, source_bad, target_bad = [], [], [], []
    for i in range(3):
        pair = survey_tile_pair(seed=rng, kernel=kernel, size=96, psf_fwhm=2.0 + 0.5 * i)
        bad = add_defects(pair.source, pair.target, seed=rng, bad_source=2e-3, bad_target=1e-3, cosmic_rays=4,
                          saturation=2e4 if i else None, flag_bad=i != 1)
        sources.append(bad.source)
        targets.append(bad.target)
        source_bad.append(~np.isfinite(bad.source))  # what the data flag; saturation and the rest to find
        target_bad.append(~np.isfinite(bad.target))
    for dtype in (np.float32, np.float64):
        src, tgt = np.stack(sources).astype(dtype), np.stack(targets).astype(dtype)
        src_ok, tgt_ok = ~np.stack(source_bad), ~np.stack(target_bad)
        found = check(src, src_ok, tgt, tgt_ok) | check(tgt, tgt_ok, src, src_ok)
        assert found[1].sum() >= 5  # the unflagged hot and dead pixels of tile 1 at least
        assert found[2].any()  # a saturated core


def test_bad_shapes():
    images = np.zeros((2, 8, 8))
    with pytest.raises(InputError, match="images must be"):
        find_defects(images[0], None, None, None)
    with pytest.raises(InputError, match="usable must have the shape"):
        find_defects(images, np.ones((2, 8, 7), dtype=bool), None, None)
    with pytest.raises(InputError, match="others must have the shape"):
        find_defects(images, None, images[:1], None)


def test_sky_statistics_are_the_spike_search_s_sky() -> None:
    """The batched sky (level, noise) equals the per-tile one the spike search uses, and the spread is the
    robust scatter of the same rows about that level."""
    rng = np.random.default_rng(4)
    images = rng.normal(100.0, 3.0, (3, 70, 50))
    images[0, 10:13, 10:13] += 400.0  # a source
    images[2] *= np.linspace(1.0, 2.0, 50)  # a gradient
    level, sigma, spread = sky_statistics(images)
    for i, image in enumerate(images):
        sky_level, sky_sigma, _ = _sky(image, np.ones(image.shape, dtype=bool))
        assert (level[i], sigma[i]) == (sky_level, sky_sigma)
        rows = image[:: max(1, image.shape[0] // 16)]
        assert spread[i] == 1.4826 * np.median(np.abs(rows - sky_level))
    assert spread[2] > 3 * sigma[2]  # the gradient spreads the pixels, not their neighbour differences
    # the level and noise measured beforehand (with a mask: the spread still from every pixel of the rows)
    usable = np.ones(images.shape, dtype=bool)
    usable[1, 0, :5] = False
    skies = tile_skies(images, usable)
    for i, image in enumerate(images):
        assert (skies.level[i], skies.sigma[i]) == _sky(image, usable[i])[:2]
    given = sky_statistics(images, skies)
    np.testing.assert_array_equal(given[0], skies.level)
    np.testing.assert_array_equal(given[1], skies.sigma)
    rows = images[:, :: images.shape[1] // 16]
    np.testing.assert_array_equal(given[2], 1.4826 * np.median(np.abs(rows - skies.level[:, None, None]), axis=(1, 2)))
    assert not skies.nan.any() and len(tile_skies(images[:0], None).level) == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), size=st.integers(1, 40),
       dtype=st.sampled_from([np.float32, np.float64]), masked=st.booleans())
def test_row_medians_are_numpys_medians(seed, rows, size, dtype, masked) -> None:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, size)).astype(dtype)
    values[:, ::3] = np.round(values[:, ::3])  # ties
    valid = rng.random((rows, size)) < 0.6 if masked else None
    if masked:
        valid[0] = False  # a row without values
    with strict_warnings():
        median, count, _ = row_medians(values.copy(), valid)
    for i in range(rows):
        own = values[i] if valid is None else values[i][valid[i]]
        assert count[i] == own.size
        if own.size:
            assert median[i] == np.median(own) and median.dtype == dtype
        else:
            assert np.isnan(median[i])
