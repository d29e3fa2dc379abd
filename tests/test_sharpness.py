"""Which image of a pair is sharper: pipeline.core.sharpness on simulated survey tiles."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.sharpness import (
    TARGET_SHARPER_TOLERANCE,
    _tile_medians,
    autocorrelation_width_difference,
    pair_spikes,
    sharpness,
    spikes,
)
from pipeline.errors import InputError, OptionError
from pipeline.sim.defects import add_defects
from pipeline.sim.scenes import convolve_varying, gaussian_kernel, moffat_psf, survey_tile_pair

SIZE = 128
PSF = 3.0          # FWHM of the sharper image's Moffat PSF, pixels
K = 15
SPARSE = {"star_density": 2e-3, "galaxy_density": 1e-3}
CROWDED = {"star_density": 1e-2, "galaxy_density": 5e-3}


def _blur_fwhm(ratio: float) -> float:
    """Gaussian kernel FWHM that widens the PSF by ``ratio`` (widths add in quadrature)."""
    return PSF * math.sqrt(ratio * ratio - 1.0)


def _pair(seed: int, ratio: float, density: dict) -> tuple[np.ndarray, ...]:
    """Source, target and their variances with ``FWHM_T / FWHM_S = ratio``.

    The sharper image has the Moffat PSF of FWHM ``PSF``; the other is it
    through a Gaussian kernel; for ``ratio < 1`` the two are swapped.
    """
    wide = max(ratio, 1.0 / ratio)
    if wide - 1.0 < 1e-9:
        kernel = np.zeros((K, K))
        kernel[K // 2, K // 2] = 1.0
    else:
        kernel = gaussian_kernel(K, fwhm=_blur_fwhm(wide))
    p = survey_tile_pair(seed=seed, kernel=kernel, size=SIZE, psf_fwhm=PSF, **density)
    if ratio >= 1.0:
        return p.source, p.target, p.source_variance, p.target_variance
    return p.target, p.source, p.target_variance, p.source_variance


def _stack(ratios, density, seed0=0):
    parts = [_pair(seed0 + i, r, density) for i, r in enumerate(ratios)]
    return [np.stack(x) for x in zip(*parts)]


def _delta_fwhm2(ratios) -> np.ndarray:
    r = np.asarray(ratios)
    return PSF**2 * (r * r - 1.0) * np.where(r >= 1.0, 1.0, 1.0 / (r * r))


RATIOS = np.array([1.1, 1.15, 1.2, 1.3, 1.4, 1.12, 1.25, 1.35])


@functools.cache
def _blurrier() -> dict[str, list[np.ndarray]]:
    return {name: _stack(RATIOS, dens, seed0=100 * k)
            for k, (name, dens) in enumerate((("sparse", SPARSE), ("crowded", CROWDED)))}


@pytest.fixture(scope="module")
def blurrier():
    return _blurrier()


@pytest.mark.parametrize("field", ["sparse", "crowded"])
def test_target_blurrier_everywhere_is_never_flagged(blurrier, field):
    src, tgt, vs, vt = blurrier[field]
    for kw in ({}, {"variance": vt, "source_variance": vs}):
        r = sharpness(src, tgt, **kw)
        assert (r.direction == 1).all(), r.width_difference
        assert not r.target_sharper.any()
        if field == "crowded":  # sparse 128-px tiles hold a few bright stars: poorly constrained
            assert not r.nearly_equal.any(), (r.width_difference, r.uncertainty)
            # the Gaussian-equivalent FWHM^2 difference, within a fifth of the truth
            np.testing.assert_allclose(r.width_difference, _delta_fwhm2(RATIOS), rtol=0.2)


@pytest.mark.parametrize("field", ["sparse", "crowded"])
def test_target_sharper_everywhere_is_flagged_and_swap_negates(blurrier, field):
    src, tgt, vs, vt = blurrier[field]
    fwd = sharpness(src, tgt, variance=vt, source_variance=vs)
    rev = sharpness(tgt, src, variance=vs, source_variance=vt)
    assert (rev.direction == -1).all()
    assert (rev.target_sharper | rev.nearly_equal).all()
    assert rev.target_sharper.mean() >= (0.75 if field == "sparse" else 1.0)
    # every step treats the two images alike: swapping them negates the measure
    np.testing.assert_allclose(rev.width_difference, -fwd.width_difference, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(rev.uncertainty, fwd.uncertainty, rtol=1e-9)


def test_seeing_gradient_crossing_over():
    """FWHM_T / FWHM_S runs from 0.75 to 1.35 across a field of tiles, crossing 1."""
    ratios = np.concatenate([np.linspace(0.75, 1.35, 21), [1.0, 1.0, 1.02, 0.98]])
    src, tgt, *_ = _stack(ratios, SPARSE, seed0=500)
    r = sharpness(src, tgt)
    clear = np.abs(ratios - 1.0) > 0.1
    want = np.where(ratios > 1.0, 1, -1)
    right = (r.direction == want)[clear]
    assert right.mean() >= 0.99, (ratios[clear], r.width_difference[clear])
    # never flagged where the source is the sharper (or the two are equal)
    assert not r.target_sharper[ratios >= 1.0].any()
    assert r.target_sharper[ratios < 0.88].all()
    # a kernel close to a delta: informational flag, not a direction flag
    equal = np.abs(_delta_fwhm2(ratios)) < 0.5 * TARGET_SHARPER_TOLERANCE
    assert equal.sum() >= 4
    assert r.nearly_equal[equal].all(), (ratios[equal], r.width_difference[equal])
    # and rarely where the two differ clearly (a sparse 128-px tile may be too poor to tell)
    assert r.nearly_equal[np.abs(_delta_fwhm2(ratios)) > 3.0].mean() <= 0.1


def test_seeing_gradient_one_field_convolved_with_a_varying_kernel():
    """One field through a kernel whose width grows across it; the other way round it is sharper."""
    big = survey_tile_pair(seed=9, kernel=np.pad([[1.0]], 1), size=4 * SIZE, psf_fwhm=PSF, **SPARSE)
    base = big.source_true

    def kernel_at(yc: float, xc: float) -> np.ndarray:
        return gaussian_kernel(K, fwhm=0.5 + 4.0 * xc / base.shape[1])

    blurred = convolve_varying(base, kernel_at, patch=SIZE, kernel_size=K)
    rng = np.random.default_rng(3)
    noise = 30.0
    a = base + rng.normal(0.0, noise, base.shape)
    b = blurred + rng.normal(0.0, noise, base.shape)

    def tiles(img):
        return img.reshape(4, SIZE, 4, SIZE).transpose(0, 2, 1, 3).reshape(16, SIZE, SIZE)

    fwhm_k = np.tile(0.5 + 4.0 * (np.arange(4) * SIZE + (SIZE - 1) / 2) / base.shape[1], 4)
    fwd = sharpness(tiles(a), tiles(b))
    rev = sharpness(tiles(b), tiles(a))
    clear = fwhm_k > 2.0
    assert (fwd.direction[clear] == 1).all() and (rev.direction[clear] == -1).all()
    assert (rev.target_sharper | rev.nearly_equal)[clear].all() and not fwd.target_sharper.any()
    assert rev.target_sharper[clear].mean() >= 0.75


def test_bad_pixels_and_defects_do_not_flip_the_answer(blurrier):
    src, tgt, *_ = blurrier["sparse"]
    clean = sharpness(src, tgt)
    rng = np.random.default_rng(0)
    # NaN pixels and a NaN band in either image, or the same as a mask
    bad = rng.random(src.shape) < 0.01
    bad[:, 40:44, :] = True
    nan_src = np.where(bad, np.nan, src)
    for r in (sharpness(nan_src, tgt), sharpness(src, np.where(bad, np.nan, tgt)),
              sharpness(src, tgt, mask=bad)):
        assert (r.direction == 1).all() and not r.target_sharper.any()
        # the same within the noise (sparse tiles: a few stars carry the measure)
        off = np.abs(r.width_difference - clean.width_difference)
        assert (off <= np.maximum(0.25 * clean.width_difference, 3 * clean.uncertainty)).all()
    np.testing.assert_array_equal(sharpness(src, tgt, mask=bad).width_difference,
                                  sharpness(nan_src, tgt).width_difference)
    # unflagged hot and dead pixels and cosmic rays, in one image or the other
    for k in range(len(src)):
        d = add_defects(src[k], tgt[k], seed=k, bad_source=0.002, bad_target=0.002,
                        flag_bad=False, cosmic_rays=4)
        fwd = sharpness(d.source, d.target)
        rev = sharpness(d.target, d.source)
        assert fwd.direction[0] == 1 and not fwd.target_sharper[0]
        assert rev.direction[0] == -1
    # inputs are never written
    assert np.isnan(nan_src).sum() == bad.sum()


def test_spikes_finds_hot_pixels_and_cosmic_rays_not_stars(blurrier):
    src, tgt, *_ = blurrier["crowded"]
    d = add_defects(src[0], tgt[0], seed=1, bad_target=0.002, flag_bad=False, cosmic_rays=10)
    good = np.ones((1, SIZE, SIZE), dtype=bool)
    found = spikes(d.target[None], good, d.source[None])[0]
    hot = d.target_pixels & (d.target > 1e4)
    assert found[hot].all()
    assert found[d.cosmic_ray & (d.target > 2000)].mean() > 0.95
    # the clean images of a crowded field: hardly a pixel (stars are never that sharp)
    assert spikes(src[:1], good, tgt[:1]).mean() < 0.002


def test_a_bright_star_blurred_far_more_in_the_other_image_is_no_spike_but_a_wide_track_is():
    # a 1e7 ADU star through a kernel of FWHM 4.7 px on a 3 px PSF: its peak stands 3.5 times the other
    # image's, more than SPIKE_UNMATCHED, but its core is not sharp (its dimmest neighbour keeps half of it);
    # a cosmic-ray track three pixels wide is light the other image has not got, its inner pixels too
    rng = np.random.default_rng(4)
    scene = np.zeros((128, 128))
    faint = zip(rng.integers(12, 116, 30), rng.integers(12, 116, 30), rng.uniform(1e3, 1e4, 30))
    for y, x, flux in ((64, 64, 1e7), *faint):
        scene[y - 10:y + 11, x - 10:x + 11] += flux * moffat_psf(21, fwhm=3.0)
    blurred = scipy.signal.fftconvolve(scene, gaussian_kernel(21, fwhm=4.7), mode="same")
    src, tgt = (image + rng.normal(0.0, 10.0, image.shape) for image in (scene, blurred))
    src[20:23, 30:46] += 5000.0
    found_s, found_t = pair_spikes(src[None], tgt[None])
    assert not found_s[0, 54:75, 54:75].any() and not found_t.any()
    assert found_s[0, 20:23, 30:46].all()


def test_pure_shift_is_nearly_equal():
    kernel = np.zeros((K, K))
    kernel[K // 2 + 2, K // 2 - 3] = 1.0
    parts = [survey_tile_pair(seed=40 + i, kernel=kernel, size=SIZE, psf_fwhm=PSF, **SPARSE)
             for i in range(6)]
    r = sharpness(np.stack([p.source for p in parts]), np.stack([p.target for p in parts]))
    assert np.abs(r.width_difference).max() < TARGET_SHARPER_TOLERANCE
    assert r.nearly_equal.all() and not r.target_sharper.any()


@settings(max_examples=15, deadline=None)
@given(scale_s=st.floats(1e-3, 1e3), scale_t=st.floats(1e-3, 1e3))
def test_flux_scale_does_not_change_the_measure(scale_s, scale_t):
    src, tgt, *_ = _blurrier()["sparse"]
    a = sharpness(src[:3], tgt[:3])
    b = sharpness(src[:3] * scale_s, tgt[:3] * scale_t)
    np.testing.assert_allclose(b.width_difference, a.width_difference, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(b.target_sharper, a.target_sharper)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fwhm=st.floats(1.5, 4.0))
def test_swap_negates_exactly_on_any_pair(seed, fwhm):
    rng = np.random.default_rng(seed)
    scene = np.zeros((64, 64))
    scene[rng.integers(0, 64, 20), rng.integers(0, 64, 20)] = rng.uniform(1e3, 1e5, 20)
    a = scipy.signal.fftconvolve(scene, moffat_psf(21, fwhm=2.5), mode="same")
    b = scipy.signal.fftconvolve(a, gaussian_kernel(21, fwhm=fwhm), mode="same")
    a += rng.normal(0, 10, a.shape)
    b += rng.normal(0, 10, b.shape)
    fwd, rev = sharpness(a, b), sharpness(b, a)
    np.testing.assert_array_equal(np.isnan(fwd.width_difference), np.isnan(rev.width_difference))
    np.testing.assert_allclose(rev.width_difference, -fwd.width_difference, rtol=1e-9, atol=1e-12)
    assert not (fwd.target_sharper & rev.target_sharper).any()


def test_shared_source_and_shapes():
    a, b, _, _ = _pair(3, 1.3, SPARSE)
    r = sharpness(a, np.stack([b, b, a]))
    assert r.width_difference.shape == (3,) and r.direction.dtype == np.int8
    assert r.direction[0] == 1 and r.direction[1] == 1
    assert abs(r.width_difference[2]) < 1e-9 and r.nearly_equal[2]
    one = sharpness(a, b)
    assert one.width_difference.shape == (1,)
    np.testing.assert_allclose(one.width_difference[0], r.width_difference[0], rtol=1e-12)


def test_alternative_measure_agrees_in_sign(blurrier):
    src, tgt, *_ = blurrier["crowded"]
    alt = autocorrelation_width_difference(src, tgt)
    assert (alt > 0).all()
    assert (autocorrelation_width_difference(tgt, src) < 0).all()


def test_input_errors():
    a = np.zeros((2, 32, 32))
    with pytest.raises(InputError, match="does not match the tiles"):
        sharpness(np.zeros((3, 32, 32)), a)
    with pytest.raises(InputError, match="at least 16"):
        sharpness(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(InputError, match="real numbers"):
        sharpness(a.astype(complex), a)
    with pytest.raises(OptionError, match="tolerance"):
        sharpness(a, a, tolerance=-1.0)
    # nothing to measure: all flat
    r = sharpness(a, a)
    assert np.isnan(r.width_difference).all() and (r.direction == 0).all()
    assert not r.target_sharper.any() and not r.nearly_equal.any()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.tuples(st.integers(16, 48), st.integers(16, 48)),
       level=st.floats(-100.0, 1000.0), holes=st.integers(0, 3))
def test_ring_spectra_of_the_mean_free_tapered_tiles(seed, shape, level, holes) -> None:
    """The ring sums of ``|FFT((x - mean_w) w)|**2``, ``w`` the taper times the good pixels and ``mean_w`` the
    weighted mean: straight from the definition, for tiles with and without bad pixels (a tile with none has
    its mean taken off the taper's few modes after the transform)."""
    from pipeline.core.sharpness import _geometry, _spectra

    rng = np.random.default_rng(seed)
    both = (level + rng.standard_normal((2, 3, *shape))).astype(np.float32)
    good = np.ones((3, *shape), dtype=bool)
    for _ in range(holes):
        good[rng.integers(0, 3), rng.integers(0, shape[0]), rng.integers(0, shape[1])] = False
    both[:, ~good] = 0.0
    sums = _spectra(both, good)[0]
    taper, index = _geometry(*shape)[:2]
    for k in range(2):
        for i in range(3):
            w = taper.astype(np.float64) * good[i]
            x = both[k, i].astype(np.float64)
            power = np.abs(np.fft.rfft2((x - (x * w).sum() / w.sum()) * w)) ** 2
            expected = np.bincount(index.ravel(), weights=power.ravel(), minlength=sums.shape[-1])
            np.testing.assert_allclose(sums[k, i], expected, rtol=2e-3, atol=1e-4 * expected.max())


@settings(max_examples=60)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=12), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]), ties=st.booleans(), shuffled=st.booleans())
def test_tile_medians_are_numpys_medians_bit_for_bit(counts, seed, dtype, ties, shuffled):
    """The flux scale's per-tile medians, all tiles at once, equal ``np.median`` of each tile's values (even
    and odd counts, repeated values, either precision, the values grouped by tile or not)."""
    rng = np.random.default_rng(seed)
    counts = np.array(counts)
    tiles = np.repeat(np.arange(counts.size), counts)
    if shuffled:
        tiles = rng.permutation(tiles)
    values = (rng.integers(0, 4, tiles.size) if ties else rng.lognormal(size=tiles.size)).astype(dtype)
    medians = _tile_medians(values, tiles, counts)
    assert medians.dtype == dtype and medians.shape == counts.shape
    for tile in np.flatnonzero(counts):
        assert medians[tile] == np.median(values[tiles == tile])
