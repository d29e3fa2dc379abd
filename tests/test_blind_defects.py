"""Defects nobody marked, found in the pixels: saturation plateaus and single-pixel spikes."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

import pipeline as km
from pipeline.core.defects import saturation_plateau, spikes
from pipeline.sim.scenes import gaussian_kernel, survey_tile_pair


def test_saturation_plateau_finds_flat_cores_only():
    rng = np.random.default_rng(13)
    image = rng.normal(size=(64, 64))
    usable = np.ones(image.shape, dtype=bool)
    assert not saturation_plateau(image, usable).any()  # one maximum: no plateau
    image[30:32, 40:43] = 50.0  # a saturated core of 6 pixels
    np.testing.assert_array_equal(np.argwhere(saturation_plateau(image, usable)),
                                  np.argwhere(image == 50.0))
    scattered = rng.normal(size=(64, 64))
    scattered[[3, 20, 50], [7, 33, 60]] = 50.0  # equal maxima that do not touch: not a core
    assert not saturation_plateau(scattered, usable).any()
    assert not saturation_plateau(np.full((16, 16), 3.0), np.ones((16, 16), dtype=bool)).any()  # flat: no core
    usable[30:32, 40:43] = False  # masked pixels are not judged
    assert not saturation_plateau(image, usable).any()


def star_field(seed: int, fwhm: float = 3.0, size: int = 96) -> np.ndarray:
    """Stars of a ``fwhm``-px Gaussian PSF at random sub-pixel positions, peaks up to 1e5, noise 10."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(size, size)) * 10.0
    for _ in range(12):
        y, x = rng.uniform(12, size - 12, 2)
        stamp = gaussian_kernel(15, fwhm=fwhm, dy=y % 1 - 0.5, dx=x % 1 - 0.5, flux=1.0)
        stamp *= rng.uniform(1e3, 1e5) / stamp.max()
        iy, ix = int(y), int(x)
        image[iy - 7 : iy + 8, ix - 7 : ix + 8] += stamp
    return image


def test_hot_and_dead_pixels_are_spikes_and_stars_are_not():
    image = star_field(1)
    usable = np.ones(image.shape, dtype=bool)
    assert not spikes(image, usable).any()  # 12 stars of FWHM 3 px, the brightest 1e4 sigma
    hits = image.copy()
    hits[20, 30] += 5e3  # hot
    hits[50, 60] -= 400.0  # dead
    hits[70, 15] += 300.0  # faint hot pixel: 30 sigma
    found = spikes(hits, usable)
    assert {tuple(p) for p in np.argwhere(found)} == {(20, 30), (50, 60), (70, 15)}
    usable[20, 30] = False  # a pixel already known bad is not reported again
    assert not spikes(hits, usable)[20, 30]


@given(st.integers(0, 10_000), st.floats(2.2, 5.0))
def test_well_sampled_stars_are_never_spikes(seed, fwhm):
    image = star_field(seed, fwhm=fwhm, size=64)
    assert not spikes(image, np.ones(image.shape, dtype=bool)).any()


def test_undersampled_stars_are_seen_in_the_other_image_and_hot_pixels_are_not():
    """Alone, a 1.2 px FWHM star peak looks like a spike; the target (the same sky through a kernel)
    lights its neighbourhood, so it is not one. A hot pixel at the same place in both images (the
    same detector) lights neither image's neighbourhood: both are spikes."""
    rng = np.random.default_rng(5)
    pair = survey_tile_pair(seed=rng, kernel=gaussian_kernel(15, fwhm=2.5), size=128, psf_fwhm=1.2)
    usable = np.ones(pair.source.shape, dtype=bool)
    alone = spikes(pair.source, usable)
    assert alone.sum() > 10
    paired = spikes(pair.source, usable, pair.target, usable)
    assert not (paired & ~alone).any()
    # what stays flagged is faint: filling it leaves the kernel as good as with no search at all
    default = km.estimate_kernels(pair.source[None], pair.target[None], kernel_size=15)
    no_search = km.estimate_kernels(pair.source[None], pair.target[None], kernel_size=15, robust=False)
    err = [np.linalg.norm(r.kernels[0] - pair.kernel) / np.linalg.norm(pair.kernel) for r in (default, no_search)]
    assert err[0] < 1.1 * err[1] + 0.002
    src, tgt = pair.source.copy(), pair.target.copy()
    quiet = np.unravel_index(np.argmin(np.abs(gaussian_filter(pair.target, 3.0))), tgt.shape)
    quiet = (int(np.clip(quiet[0], 2, 125)), int(np.clip(quiet[1], 2, 125)))
    src[quiet] += 2e4
    tgt[quiet] += 2e4
    assert spikes(src, usable, tgt, usable)[quiet] and spikes(tgt, usable, src, usable)[quiet]
