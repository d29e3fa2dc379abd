"""Which image is sharper, from the Welch segments' own spectra; and the spikes Welch fills first."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import pipeline as km
from pipeline.core.defects import tile_skies
from pipeline.core.estimate import tile_sharpness
from pipeline.core.sharpness import SPIKE_MOST, pair_spikes, sharpness, spectra_sharpness
from pipeline.core.welch import welch_kernels
from pipeline.errors import InputError
from pipeline.sim.defects import add_defects
from pipeline.sim.scenes import gaussian_kernel, survey_tile_pair

SIZE = 128
PSF = 3.0
K = 15
SPARSE = {"star_density": 2e-3, "galaxy_density": 1e-3}
CROWDED = {"star_density": 1e-2, "galaxy_density": 5e-3}
RATIOS = np.array([1.1, 1.15, 1.2, 1.3, 1.4, 1.12, 1.25, 1.35])


def _delta_fwhm2(ratios: np.ndarray) -> np.ndarray:
    return PSF**2 * (ratios * ratios - 1.0)


@functools.cache
def _field(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Tiles whose target is blurrier by RATIOS (Gaussian kernels on a Moffat PSF)."""
    density = SPARSE if name == "sparse" else CROWDED
    pairs = [survey_tile_pair(seed=300 + i, kernel=gaussian_kernel(K, fwhm=PSF * math.sqrt(r * r - 1.0)),
                              size=SIZE, psf_fwhm=PSF, **density) for i, r in enumerate(RATIOS)]
    return np.stack([p.source for p in pairs]), np.stack([p.target for p in pairs])


def _measure(src: np.ndarray, tgt: np.ndarray, **kw):
    return welch_kernels(src, tgt, kernel_size=K, measure=True, spectra_only=True, **kw).sharpness


@pytest.mark.parametrize("field", ["sparse", "crowded"])
def test_the_spectra_measure_agrees_with_the_tiles_and_swapping_negates_it(field):
    src, tgt = _field(field)
    seg = _measure(src, tgt)
    tile = sharpness(src, tgt)
    assert (seg.direction == 1).all() and not seg.target_sharper.any()
    if field == "crowded":  # sparse 128-px tiles hold a few bright stars: poorly constrained
        np.testing.assert_allclose(seg.width_difference, _delta_fwhm2(RATIOS), rtol=0.2)
        np.testing.assert_allclose(seg.width_difference, tile.width_difference, rtol=0.15)
    else:
        off = np.abs(seg.width_difference - tile.width_difference)
        assert (off <= 0.3 * tile.width_difference).all(), (seg.width_difference, tile.width_difference)
    assert (seg.uncertainty > 0).all() and (seg.rings >= 3).all()
    rev = _measure(tgt, src)
    assert (rev.direction == -1).all()
    assert rev.target_sharper.mean() >= (0.75 if field == "sparse" else 1.0)
    np.testing.assert_allclose(rev.width_difference, -seg.width_difference, rtol=1e-6)
    np.testing.assert_allclose(rev.uncertainty, seg.uncertainty, rtol=1e-6)


def test_spectra_measure_of_given_spectra_is_exactly_antisymmetric():
    rng = np.random.default_rng(3)
    f = np.sqrt(np.fft.fftfreq(32)[:, None] ** 2 + np.fft.rfftfreq(32)[None, :] ** 2)
    base = 1e4 * np.exp(-30.0 * f * f) * rng.gamma(20.0, 1 / 20.0, (5, 32, 17)) + 1.0
    blurred = base * np.exp(-40.0 * f * f) + 1.0
    looks = np.array([9, 9, 4, 1, 0])
    one, two = spectra_sharpness(base, blurred, looks), spectra_sharpness(blurred, base, looks)
    np.testing.assert_array_equal(two.width_difference, -one.width_difference)
    np.testing.assert_array_equal(one.uncertainty, two.uncertainty)
    assert (one.width_difference[:4] > 0).all()
    assert np.isnan(one.width_difference[4]) and one.direction[4] == 0  # no segment: not measured
    # more looks, the same spectra: the same measure, a smaller uncertainty
    assert one.uncertainty[2] < one.uncertainty[3]
    with pytest.raises(InputError, match="half spectra"):
        spectra_sharpness(base, blurred[:, :, :16], looks)
    with pytest.raises(InputError, match="at least 16"):
        spectra_sharpness(base[:, :8, :5], blurred[:, :8, :5], looks)


def test_cosmic_rays_and_hot_pixels_are_filled_before_the_spectra():
    """Unflagged defects: the kernels stay near the clean ones and the measure keeps its sign."""
    src, tgt = _field("sparse")
    truth = [gaussian_kernel(K, fwhm=PSF * math.sqrt(r * r - 1.0)) for r in RATIOS]
    clean = welch_kernels(src, tgt, kernel_size=K, measure=True)
    defects = [add_defects(s, t, seed=k, bad_source=0.001, bad_target=0.001, flag_bad=False, cosmic_rays=3)
               for k, (s, t) in enumerate(zip(src, tgt))]
    d_src = np.stack([d.source for d in defects])
    d_tgt = np.stack([d.target for d in defects])
    hit = welch_kernels(d_src, d_tgt, kernel_size=K, measure=True)
    unfilled = welch_kernels(d_src, d_tgt, kernel_size=K, measure=True, find_defects=False)

    def error(kernels):
        return np.median([np.linalg.norm(k - t) / np.linalg.norm(t) for k, t in zip(kernels, truth)])

    # (the tracks' cores are too wide to fill: the segments they touch are dropped, 2-6 of 9 kept)
    assert error(hit.kernels) <= 2.0 * error(clean.kernels)
    assert error(unfilled.kernels) > 4.0 * error(clean.kernels)  # what the search is for
    assert (hit.sharpness.direction == 1).all() and not hit.sharpness.target_sharper.any()
    reverse = _measure(d_tgt, d_src)
    assert (reverse.direction == -1).all()
    # the spikes found, one pixel wide: each image's own, cosmic-ray tracks included; the same with each
    # image's sky as the defect search measures it (from fewer rows) given
    for skies in (None, (tile_skies(d_src, None), tile_skies(d_tgt, None))):
        found_s, found_t = pair_spikes(d_src, d_tgt, skies=skies)
        for d, fs, ft in zip(defects, found_s, found_t):
            hot_t = d.target_pixels & (d.target > 1e4)
            assert ft[hot_t].all()
            assert ft[d.cosmic_ray & (d.target > 2000)].mean() >= 0.85  # one pixel wide: a track's fringe is left
            assert not fs[d.cosmic_ray & ~d.source_pixels].any()  # the target's tracks are not the source's


def test_pair_spikes_finds_nothing_in_clean_fields_nor_in_textured_images():
    src, tgt = _field("crowded")
    found_s, found_t = pair_spikes(src, tgt)
    assert found_s.mean() < 1e-3 and found_t.mean() < 1e-3
    # a texture with sharp pixels everywhere is not a sky: nothing reported
    rng = np.random.default_rng(5)
    texture = rng.random((2, 64, 64)) ** 8 * 255.0
    blurred = 0.25 * (texture + np.roll(texture, 1, 1) + np.roll(texture, 1, 2) + np.roll(texture, (1, 1), (1, 2)))
    fs, ft = pair_spikes(np.round(blurred), np.round(texture))
    assert fs.sum(axis=(1, 2)).max() <= SPIKE_MOST * 64 * 64 and ft.sum(axis=(1, 2)).max() <= SPIKE_MOST * 64 * 64


def test_estimate_kernels_welch_measures_from_its_spectra_and_decides_as_given():
    src, tgt = _field("crowded")
    # the first three tiles exchanged: their targets are the sharper images
    sources = np.concatenate([tgt[:3], src[3:]])
    targets = np.concatenate([src[:3], tgt[3:]])
    auto = km.estimate_kernels(sources, targets, kernel_size=K, method="welch", direction="auto")
    np.testing.assert_array_equal(auto.direction, [-1, -1, -1, 1, 1, 1, 1, 1])
    given = km.estimate_kernels(sources, targets, kernel_size=K, method="welch", direction=auto.direction)
    for name in ("kernels", "flux", "background", "flags", "width_difference", "width_difference_error",
                 "residual"):
        np.testing.assert_array_equal(getattr(auto, name), getattr(given, name), err_msg=name)
    measure = tile_sharpness(sources, targets, kernel_size=K, method="welch")
    np.testing.assert_array_equal(measure.width_difference[3:], auto.width_difference[3:])
    np.testing.assert_allclose(measure.width_difference, auto.width_difference, rtol=1e-5)
    assert (measure.target_sharper == (auto.width_difference < 0)).all()
    # every tile reversed by the majority: as if reverse were given
    majority = km.estimate_kernels(targets, sources, kernel_size=K, method="welch", direction="majority", workers=2)
    reverse = km.estimate_kernels(targets, sources, kernel_size=K, method="welch", direction="reverse")
    np.testing.assert_array_equal(majority.direction, -1)
    for name in ("kernels", "flux", "flags", "width_difference"):
        np.testing.assert_array_equal(getattr(majority, name), getattr(reverse, name), err_msg=name)
    assert (majority.width_difference[3:] < 0).all()
