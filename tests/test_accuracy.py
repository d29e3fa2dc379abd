"""Accuracy on the two data kinds the estimators exist for.

1. The textbook case: a natural 8-bit photo blurred with edge extension.
2. Simulated ground-based survey tiles (stars and galaxies, Poisson and read
   noise on both images, a sky offset) against the exact solver run with the
   best regularisation chosen per tile using the truth.
"""

import numpy as np
import pytest
from kernels import rel_l2
from scipy.ndimage import binary_dilation

import pipeline as km
import pipeline.flags
from pipeline.core.moments import adaptive_moments
from pipeline.sim.scenes import blurred_photo, gaussian_kernel, motion_kernel, survey_tile_pair

skimage_data = pytest.importorskip("skimage.data")

PHOTO_KERNELS = {
    "gaussian": lambda k: gaussian_kernel(k, fwhm=3.0, e1=0.1, dy=0.3),
    "motion-streak": lambda k: motion_kernel(k, length=5.0, angle_deg=30.0, dy=1.0, dx=-2.0),
}


def cross_artifact(est, truth):
    """Mean energy on the central row/column outside the true support, over the
    mean energy elsewhere outside it: about 1 without an edge cross."""
    k = truth.shape[0]
    support = binary_dilation(np.abs(truth) > 1e-3 * np.abs(truth).max())
    cross = np.zeros_like(support)
    cross[k // 2, :] = cross[:, k // 2] = True
    return np.mean(est[cross & ~support] ** 2) / np.mean(est[~cross & ~support] ** 2)


@pytest.fixture(scope="module")
def photo():
    return skimage_data.camera().astype(np.float64)


@pytest.mark.parametrize("name", sorted(PHOTO_KERNELS))
def test_photo_default_method_recovers_the_kernel_without_edge_cross(photo, name):
    k = 15
    kernel = PHOTO_KERNELS[name](k)
    src, tgt = blurred_photo(photo, kernel)
    default = km.estimate_kernel(src, tgt, kernel_size=k)
    ratio = km.estimate_kernel(src, tgt, kernel_size=k, method="ratio")
    assert rel_l2(default, kernel) <= 0.01
    assert rel_l2(ratio, kernel) > 0.08  # the textbook division: noise and edge leakage
    assert cross_artifact(ratio, kernel) > 8.0
    assert cross_artifact(default, kernel) < 2.0
    # asymmetric kernels come back in convolution orientation, not flipped
    if name == "motion-streak":
        assert rel_l2(default, kernel[::-1, ::-1]) > 0.5


@pytest.fixture(scope="module")
def survey():
    """36 survey tiles, each with its own slightly wider, elliptical kernel."""
    rng = np.random.default_rng(2026)
    k = 21
    sources, targets, kernels = [], [], []
    for _ in range(36):
        kernel = gaussian_kernel(
            k, fwhm=rng.uniform(2.5, 3.5), e1=rng.uniform(-0.08, 0.08), e2=rng.uniform(-0.08, 0.08),
            dy=rng.uniform(-0.3, 0.3), dx=rng.uniform(-0.3, 0.3), flux=rng.uniform(0.9, 1.1),
        )
        pair = survey_tile_pair(seed=rng, kernel=kernel, size=256)
        sources.append(pair.source)
        targets.append(pair.target)
        kernels.append(kernel)
    return np.stack(sources), np.stack(targets), np.stack(kernels), k


def figures(kernels, truth):
    est, tru = adaptive_moments(kernels), adaptive_moments(truth)
    return {
        "l2": np.median([rel_l2(a, b) for a, b in zip(kernels, truth)]),
        "fwhm": np.median(np.abs(est.fwhm / tru.fwhm - 1.0)),
        "ellipticity": np.median(np.hypot(est.e1 - tru.e1, est.e2 - tru.e2)),
        "flux": np.median(np.abs(kernels.sum(axis=(1, 2)) / truth.sum(axis=(1, 2)) - 1.0)),
        "centroid": np.median(np.hypot(est.y - tru.y, est.x - tru.x)),
    }


def oracle(src, tgt, truth, k, penalty):
    """Exact solver with the truth-chosen best fixed regularisation per tile."""
    best = np.full(truth.shape, np.nan)
    best_err = np.full(len(truth), np.inf)
    for lam in np.logspace(-4, 3, 15):
        res = km.estimate_kernels(src, tgt, kernel_size=k, regularization=lam, penalty=penalty,
                                  robust=False, workers=2)
        err = np.sqrt(((res.kernels - truth) ** 2).sum(axis=(1, 2)) / (truth**2).sum(axis=(1, 2)))
        better = err < best_err
        best[better], best_err[better] = res.kernels[better], err[better]
    return best


@pytest.mark.slow
def test_survey_tiles_default_method_against_truth_tuned_exact_solver(survey):
    src, tgt, truth, k = survey
    auto = km.estimate_kernels(src, tgt, kernel_size=k, workers=2)
    assert not np.any(auto.flags & km.flags.BAD)
    ours = figures(auto.kernels, truth)
    laplacian = figures(oracle(src, tgt, truth, k, "laplacian"), truth)
    same_family = figures(oracle(src, tgt, truth, k, "compact"), truth)
    print("default", ours, "\nlaplacian oracle", laplacian, "\ncompact oracle", same_family)
    # automatic regularisation within 1.15x of the truth-tuned solvers' kernel error
    assert ours["l2"] <= 1.15 * same_family["l2"]
    assert ours["l2"] <= 1.15 * laplacian["l2"]
    # width and shape from adaptive moments: the width within 2 %; the shape
    # error is at the noise floor of these tiles (the truth-tuned solver's)
    assert ours["fwhm"] <= 0.02
    assert ours["ellipticity"] <= 1.15 * laplacian["ellipticity"]
    assert ours["ellipticity"] <= 0.025
    # flux scale and centroid as accurate as the truth-tuned exact solver's
    assert ours["flux"] <= 1.15 * laplacian["flux"]
    assert ours["centroid"] <= 1.15 * laplacian["centroid"]
    # the diagnostics agree with the kernels they describe
    np.testing.assert_allclose(auto.flux, auto.kernels.sum(axis=(1, 2)))
    assert np.median(np.abs(auto.fwhm / adaptive_moments(truth).fwhm - 1.0)) == pytest.approx(ours["fwhm"])
    # the background offset is recovered (sky offset 37.5 relative to K * source)
    assert np.median(np.abs(auto.background - 37.5)) < 1.0


@pytest.mark.slow
def test_welch_is_a_fair_cross_check_on_survey_tiles(survey):
    src, tgt, truth, k = survey
    welch = km.estimate_kernels(src[:12], tgt[:12], kernel_size=k, method="welch")
    ratio = km.estimate_kernels(src[:12], tgt[:12], kernel_size=k, method="ratio")
    w, r = figures(welch.kernels, truth[:12]), figures(ratio.kernels, truth[:12])
    assert w["l2"] < r["l2"]
    assert w["flux"] < 0.1


def survey_set(make_kernel, n, seed, k=21):
    rng = np.random.default_rng(seed)
    src, tgt, truth = [], [], []
    for _ in range(n):
        kernel = make_kernel(rng, k)
        pair = survey_tile_pair(seed=rng, kernel=kernel, size=256)
        src.append(pair.source)
        tgt.append(pair.target)
        truth.append(kernel)
    return np.stack(src), np.stack(tgt), np.stack(truth)


@pytest.mark.slow
def test_shifted_kernels_are_as_accurate_as_centred_ones():
    """A shift between the images moves the kernel off the stamp centre; the
    compact penalty follows it."""
    def centred(rng, k):
        return gaussian_kernel(k, fwhm=3.0, e1=0.05, dy=rng.uniform(-0.3, 0.3))

    def shifted(rng, k):
        return gaussian_kernel(k, fwhm=3.0, e1=0.05, dy=3.0 + rng.uniform(-0.3, 0.3), dx=-2.5)

    errors = {}
    for name, make in (("centred", centred), ("shifted", shifted)):
        src, tgt, truth = survey_set(make, 8, seed=11)
        res = km.estimate_kernels(src, tgt, kernel_size=21, workers=2)
        errors[name] = figures(res.kernels, truth)
    assert errors["shifted"]["l2"] < 1.3 * errors["centred"]["l2"]
    assert errors["shifted"]["centroid"] < 0.03


@pytest.mark.slow
def test_wings_penalty_keeps_the_flux_of_extended_kernels():
    """Moffat-like kernels: the compact amplitude term loses wing light, 'wings' keeps it."""
    from pipeline.sim.scenes import moffat_psf

    src, tgt, truth = survey_set(
        lambda rng, k: 0.9 * moffat_psf(k, fwhm=3.0 + rng.uniform(0.0, 0.3), beta=2.5, e1=0.05), 8, seed=12
    )
    compact = km.estimate_kernels(src, tgt, kernel_size=21, workers=2)
    wings = km.estimate_kernels(src, tgt, kernel_size=21, penalty="wings", workers=2)
    laplacian = km.estimate_kernels(src, tgt, kernel_size=21, penalty="laplacian", workers=2)
    f_compact, f_wings, f_lap = (figures(r.kernels, truth) for r in (compact, wings, laplacian))
    assert f_compact["flux"] > 0.01  # the documented limitation
    assert f_wings["flux"] < 0.01
    assert f_wings["flux"] < 0.5 * f_compact["flux"]
    assert f_wings["l2"] < f_lap["l2"]
