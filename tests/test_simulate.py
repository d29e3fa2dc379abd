"""Tests of the synthetic kernels and image pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
from scipy.signal import fftconvolve

from pipeline.core.moments import FWHM_PER_SIGMA, adaptive_moments
from pipeline.errors import InputError, OptionError
from pipeline.sim.scenes import (
    SurveyPair,
    blurred_photo,
    gaussian_kernel,
    moffat_psf,
    motion_kernel,
    survey_tile_pair,
)


def plain_moments(stamp: np.ndarray) -> tuple[float, float, float, float, float]:
    """Unweighted centroid offsets and covariance (yy, xy, xx) of a stamp."""
    ky, kx = stamp.shape
    y = (np.arange(ky) - ky // 2)[:, None]
    x = (np.arange(kx) - kx // 2)[None, :]
    f = stamp.sum()
    cy, cx = (stamp * y).sum() / f, (stamp * x).sum() / f
    yy = (stamp * (y - cy) ** 2).sum() / f
    xy = (stamp * (y - cy) * (x - cx)).sum() / f
    xx = (stamp * (x - cx) ** 2).sum() / f
    return cy, cx, yy, xy, xx


# --------------------------------------------------------------------------
# gaussian_kernel


@pytest.mark.parametrize(
    ("fwhm", "e1", "e2", "dy", "dx", "flux"),
    [
        (5.0, 0.0, 0.0, 0.0, 0.0, 1.0),
        (5.0, 0.2, -0.1, 0.3, -0.45, 0.83),
        (6.0, -0.3, 0.25, -1.5, 2.25, 12.5),
        (4.8, 0.0, 0.5, 0.5, 0.5, 1.0),
    ],
)
def test_gaussian_kernel_has_requested_moments(fwhm: float, e1: float, e2: float,
                                               dy: float, dx: float, flux: float) -> None:
    k = gaussian_kernel(51, fwhm=fwhm, e1=e1, e2=e2, dy=dy, dx=dx, flux=flux)
    assert k.shape == (51, 51) and k.dtype == np.float64
    assert k.sum() == pytest.approx(flux, rel=1e-12)
    # Unweighted moments of the sampled Gaussian are its covariance.
    cy, cx, yy, xy, xx = plain_moments(k)
    sigma2 = (fwhm / FWHM_PER_SIGMA) ** 2
    half_trace = sigma2 / math.sqrt(1 - e1 * e1 - e2 * e2)
    np.testing.assert_allclose([cy, cx], [dy, dx], atol=1e-9)
    np.testing.assert_allclose([yy, xy, xx],
                               [half_trace * (1 - e1), half_trace * e2, half_trace * (1 + e1)],
                               rtol=1e-9, atol=1e-9)
    # ... and what adaptive_moments reports.
    m = adaptive_moments(k)
    assert m.converged
    assert m.fwhm == pytest.approx(fwhm, rel=1e-6)
    assert (m.e1, m.e2) == (pytest.approx(e1, abs=1e-6), pytest.approx(e2, abs=1e-6))
    assert (m.y, m.x) == (pytest.approx(dy, abs=1e-6), pytest.approx(dx, abs=1e-6))
    assert m.flux == pytest.approx(flux)


def test_gaussian_kernel_integer_offset_is_a_shift() -> None:
    centred = gaussian_kernel(31, fwhm=3.0, e1=0.1)
    shifted = gaussian_kernel(31, fwhm=3.0, e1=0.1, dy=2, dx=-3)
    np.testing.assert_allclose(shifted[2:, :-3], centred[:-2, 3:], rtol=1e-9, atol=1e-14)
    # The convention: convolving with it moves an image by (+2, -3).
    image = np.zeros((40, 40))
    image[20, 20] = 1.0
    moved = fftconvolve(image, shifted, mode="same")
    assert np.unravel_index(np.argmax(moved), moved.shape) == (22, 17)


@pytest.mark.parametrize(
    "kwargs",
    [dict(size=10, fwhm=2.0), dict(size=0, fwhm=2.0), dict(size=9.0, fwhm=2.0),
     dict(size=9, fwhm=0.0), dict(size=9, fwhm=-1.0), dict(size=9, fwhm=2.0, e1=0.8, e2=0.6),
     dict(size=9, fwhm=2.0, flux=np.inf), dict(size=9, fwhm=0.05, dy=40.0)],
)
def test_gaussian_kernel_rejects_bad_options(kwargs: dict) -> None:
    size = kwargs.pop("size")
    with pytest.raises(OptionError):
        gaussian_kernel(size, **kwargs)


# --------------------------------------------------------------------------
# moffat_psf


def test_moffat_psf() -> None:
    psf = moffat_psf(41, fwhm=4.0, beta=2.5)
    assert psf.sum() == pytest.approx(1.0, rel=1e-12)
    c = 20
    # Pixel centres at r = fwhm / 2 are at half maximum.
    assert psf[c, c + 2] / psf[c, c] == pytest.approx(0.5, rel=1e-12)
    assert psf[c + 2, c] / psf[c, c] == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(psf, psf.T, rtol=1e-12)
    np.testing.assert_allclose(psf, psf[::-1, ::-1], rtol=1e-12)
    elong = moffat_psf(41, fwhm=4.0, e1=0.3)
    m = adaptive_moments(elong)
    assert m.e1 > 0.2 and abs(m.e2) < 1e-9
    with pytest.raises(OptionError):
        moffat_psf(21, fwhm=3.0, beta=1.0)


# --------------------------------------------------------------------------
# motion_kernel


@pytest.mark.parametrize(
    ("length", "angle", "dy", "dx", "flux"),
    [(6.0, 30.0, 1.0, -2.0, 1.0), (9.5, 200.0, 0.3, 0.7, 0.8), (4.0, 90.0, 0.0, 0.0, 2.0),
     (0.0, 0.0, 0.25, -0.5, 1.0), (12.0, -45.0, -3.0, -3.0, 1.0)],
)
def test_motion_kernel_flux_and_centroid(length: float, angle: float, dy: float, dx: float,
                                         flux: float) -> None:
    k = motion_kernel(31, length=length, angle_deg=angle, dy=dy, dx=dx, flux=flux)
    assert k.shape == (31, 31)
    assert k.sum() == pytest.approx(flux, rel=1e-12)
    assert k.min() >= 0.0
    cy, cx, *_ = plain_moments(k)
    a = math.radians(angle)
    assert cy == pytest.approx(dy + 0.5 * length * math.sin(a), abs=1e-9)
    assert cx == pytest.approx(dx + 0.5 * length * math.cos(a), abs=1e-9)


def test_motion_kernel_is_an_asymmetric_streak() -> None:
    k = motion_kernel(21, length=6.0, angle_deg=0.0)
    assert not np.allclose(k, k[::-1, ::-1])
    # Horizontal from the centre pixel: only the centre row, columns 10..16.
    assert np.count_nonzero(k.sum(axis=1)) == 1 and k[10].sum() == pytest.approx(1.0)
    assert np.flatnonzero(k[10]).tolist() == list(range(10, 17))
    # Interior pixels receive one pixel's worth of the streak each.
    np.testing.assert_allclose(k[10, 11:16], 1.0 / 6.0, rtol=1e-12)
    m = adaptive_moments(motion_kernel(21, length=7.0, angle_deg=35.0))
    assert m.converged and m.ellipticity > 0.5


def test_motion_kernel_must_fit() -> None:
    with pytest.raises(OptionError):
        motion_kernel(11, length=8.0, angle_deg=0.0)
    with pytest.raises(OptionError):
        motion_kernel(11, length=1.0, angle_deg=0.0, dy=6.0)
    with pytest.raises(OptionError):
        motion_kernel(11, length=-1.0, angle_deg=0.0)
    with pytest.raises(OptionError):
        motion_kernel(12, length=1.0, angle_deg=0.0)


# --------------------------------------------------------------------------
# survey_tile_pair


KERNEL = gaussian_kernel(21, fwhm=2.5, e1=0.08, e2=-0.05, dy=0.4, dx=-0.7, flux=0.93)


@pytest.fixture(scope="module")
def pair() -> SurveyPair:
    return survey_tile_pair(seed=7, kernel=KERNEL)


def test_survey_is_deterministic(pair: SurveyPair) -> None:
    again = survey_tile_pair(seed=7, kernel=KERNEL)
    for name in ("source", "target", "source_true", "target_true", "source_variance"):
        np.testing.assert_array_equal(getattr(again, name), getattr(pair, name))
    np.testing.assert_array_equal(again.catalog, pair.catalog)
    from_gen = survey_tile_pair(seed=np.random.default_rng(7), kernel=KERNEL)
    np.testing.assert_array_equal(from_gen.target, pair.target)
    other = survey_tile_pair(seed=8, kernel=KERNEL)
    assert not np.array_equal(other.source_true, pair.source_true)


def test_survey_shapes_and_truth(pair: SurveyPair) -> None:
    for name in ("source", "target", "source_true", "target_true",
                 "source_variance", "target_variance"):
        arr = getattr(pair, name)
        assert arr.shape == (256, 256) and arr.dtype == np.float64, name
        assert np.isfinite(arr).all(), name
    np.testing.assert_array_equal(pair.kernel, KERNEL)
    assert pair.background == 37.5
    assert pair.psf.sum() == pytest.approx(1.0)
    assert pair.pad >= KERNEL.shape[0] // 2


def test_target_is_source_convolved_everywhere(pair: SurveyPair) -> None:
    p, n = pair.pad, 256
    scale = np.abs(pair.target_true).max()
    np.testing.assert_allclose(pair.source_canvas[p:p + n, p:p + n], pair.source_true,
                               rtol=0, atol=1e-12 * scale)
    # Whole tile, edges included: the convolution of the padded canvas.
    full = fftconvolve(pair.source_canvas, KERNEL, mode="same")[p:p + n, p:p + n]
    np.testing.assert_allclose(pair.target_true, full + pair.background,
                               rtol=0, atol=1e-10 * scale)
    # Interior: the plain 'same' convolution of the tile itself.
    h = KERNEL.shape[0] // 2
    same = fftconvolve(pair.source_true, KERNEL, mode="same") + pair.background
    np.testing.assert_allclose(pair.target_true[h:-h, h:-h], same[h:-h, h:-h],
                               rtol=0, atol=1e-10 * scale)
    # At the edges the tile alone misses light from just outside it.
    assert np.abs(pair.target_true - same).max() > 1.0


def test_survey_noise_is_as_documented(pair: SurveyPair) -> None:
    gain, read_noise, sky = 1.0, 5.0, 1000.0
    np.testing.assert_allclose(pair.source_variance,
                               (pair.source_true + sky) / gain + (read_noise / gain) ** 2)
    np.testing.assert_allclose(pair.target_variance,
                               (pair.target_true - pair.background + sky) / gain
                               + (read_noise / gain) ** 2)
    for noisy, true, var in ((pair.source, pair.source_true, pair.source_variance),
                             (pair.target, pair.target_true, pair.target_variance)):
        z = (noisy - true) / np.sqrt(var)
        assert abs(z.mean()) < 0.02
        assert z.std() == pytest.approx(1.0, abs=0.02)
    # The difference image R - K*S - b has the variance of both terms.
    h = KERNEL.shape[0] // 2
    diff = (pair.target - fftconvolve(pair.source, KERNEL, mode="same") - pair.background)
    expect = pair.target_variance + fftconvolve(pair.source_variance, KERNEL ** 2, mode="same")
    z = (diff / np.sqrt(expect))[h:-h, h:-h]
    assert abs(z.mean()) < 0.02
    assert z.std() == pytest.approx(1.0, abs=0.03)


def test_survey_scene_is_realistic(pair: SurveyPair) -> None:
    cat = pair.catalog
    stars, galaxies = cat[cat["kind"] == "star"], cat[cat["kind"] == "galaxy"]
    assert len(stars) > 100 and len(galaxies) > 50
    # Fluxes spread over decades, from near the detection limit to very bright.
    assert cat["flux"].max() / cat["flux"].min() > 100
    for group in (stars, galaxies):
        assert group["flux"].max() / group["flux"].min() > 30
        assert group["flux"].min() >= 1e3 and group["flux"].max() <= 1e6
    assert cat["flux"].max() > 1e5
    # dN/dF ∝ F^-2 on [1e3, 1e6]: P(F < 2e3) ≈ 1/2, P(F > 1e4) ≈ 1/10.
    assert np.mean(cat["flux"] < 2e3) == pytest.approx(0.5, abs=0.07)
    assert np.mean(cat["flux"] > 1e4) == pytest.approx(0.1, abs=0.04)
    assert ((galaxies["hlr"] >= 1) & (galaxies["hlr"] <= 6)).all()
    # Objects off the tile are simulated too.
    off = (cat["y"] < 0) | (cat["y"] > 255) | (cat["x"] < 0) | (cat["x"] > 255)
    assert off.any()
    # Sky-limited faint pixels: the median source pixel is near the noise level.
    noise = math.sqrt(1000.0 + 25.0)
    assert np.median(pair.source_variance) == pytest.approx(noise ** 2, rel=0.05)
    assert np.percentile(pair.source_true, 99.9) > 50 * noise


def test_survey_offsets_and_gain() -> None:
    k = motion_kernel(15, length=4.0, angle_deg=60.0, flux=1.2)
    p = survey_tile_pair(seed=3, kernel=k, size=64, sky=500.0, target_sky=800.0, gain=2.0,
                         read_noise=4.0, sky_offset=10.0, source_sky_offset=-5.0,
                         star_density=1e-3, galaxy_density=5e-4)
    assert p.background == pytest.approx(10.0 - 1.2 * -5.0)
    h = 7
    same = fftconvolve(p.source_true, k, mode="same") + p.background
    np.testing.assert_allclose(p.target_true[h:-h, h:-h], same[h:-h, h:-h],
                               rtol=0, atol=1e-9 * np.abs(same).max())
    np.testing.assert_allclose(p.source_variance, (p.source_true + 5.0 + 500.0) / 2.0 + 4.0)
    np.testing.assert_allclose(p.target_variance, (p.target_true - 10.0 + 800.0) / 2.0 + 4.0)
    # Photon noise in electrons: ADU values times the gain differ by integers
    # plus read noise.
    z = (p.source - p.source_true) / np.sqrt(p.source_variance)
    assert z.std() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    ("kernel", "kwargs", "error"),
    [(np.ones((4, 5)), {}, InputError), (np.ones(5), {}, InputError),
     (np.full((3, 3), np.nan), {}, InputError), (np.ones((3, 3)), {"size": 0}, OptionError),
     (np.ones((3, 3)), {"gain": 0.0}, OptionError),
     (np.ones((3, 3)), {"star_flux": (10.0, 1.0)}, OptionError),
     (np.ones((3, 3)), {"star_density": -1.0}, OptionError)],
)
def test_survey_rejects_bad_input(kernel: np.ndarray, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        survey_tile_pair(seed=0, kernel=kernel, **kwargs)


# --------------------------------------------------------------------------
# blurred_photo


def test_ndimage_convolve_matches_fftconvolve_convention() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 50))
    kernel = motion_kernel(9, length=3.0, angle_deg=40.0, dy=-1.0, dx=0.5)
    h = 4
    np.testing.assert_allclose(
        scipy.ndimage.convolve(image, kernel, mode="nearest")[h:-h, h:-h],
        fftconvolve(image, kernel, mode="same")[h:-h, h:-h], rtol=0, atol=1e-12)


def test_blurred_photo() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    image = skimage_data.camera()
    kernel = motion_kernel(15, length=5.0, angle_deg=20.0, dy=-1.0, dx=1.0)
    source, target = blurred_photo(image, kernel)
    assert source.dtype == np.float64 and target.dtype == np.float64
    assert source.shape == target.shape == image.shape
    np.testing.assert_array_equal(source, image)
    assert np.array_equal(target, np.round(target))
    assert target.min() >= 0 and target.max() <= 255
    h = 7
    exact = fftconvolve(source, kernel, mode="same")[h:-h, h:-h]
    assert np.abs(target[h:-h, h:-h] - np.clip(exact, 0, 255)).max() <= 0.5 + 1e-9
    # Clipping happens where the convolution leaves [0, 255].
    bright = blurred_photo(np.full((20, 20), 250.0), np.full((3, 3), 0.25))[1]
    assert (bright == 255).all()


@pytest.mark.parametrize(
    ("image", "kernel"),
    [(np.zeros((5, 5, 3)), np.ones((3, 3))), (np.zeros((5, 5)), np.ones((2, 3))),
     (np.zeros((5, 5)), np.ones(3)), (np.zeros((5, 5), complex), np.ones((3, 3)))],
)
def test_blurred_photo_rejects_bad_input(image: np.ndarray, kernel: np.ndarray) -> None:
    with pytest.raises(InputError):
        blurred_photo(image, kernel)
