"""Tests of the textbook ratio estimator, :func:`pipeline.core.ratio.ratio_kernels`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from kernels import circular_convolve, delta, l_kernel

from pipeline.errors import OptionError
from pipeline.core.ratio import RatioResult, ratio_kernels


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((3, 64, 64))


@pytest.mark.parametrize("dy,dx", [(0, 0), (2, -3), (-4, 1), (5, 5)])
def test_periodic_shift_is_exact_delta(noise: np.ndarray, dy: int, dx: int) -> None:
    tgt = np.roll(noise, (dy, dx), axis=(1, 2))
    res = ratio_kernels(noise, tgt, kernel_size=11)
    assert isinstance(res, RatioResult)
    assert res.kernels.shape == (3, 11, 11) and res.kernels.dtype == np.float64
    np.testing.assert_allclose(res.kernels, np.broadcast_to(delta(11, dy, dx), (3, 11, 11)), atol=1e-10)


def test_smooth_image_shift() -> None:
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(np.random.default_rng(2).standard_normal((1, 80, 80)), (0, 1.5, 1.5), mode="wrap")
    res = ratio_kernels(img, np.roll(img, (3, -2), axis=(1, 2)), kernel_size=9)
    np.testing.assert_allclose(res.kernels[0], delta(9, 3, -2), atol=1e-8)


def test_asymmetric_kernel_not_flipped(noise: np.ndarray) -> None:
    kern = l_kernel(9)
    tgt = circular_convolve(noise, kern)
    res = ratio_kernels(noise, tgt, kernel_size=9)
    np.testing.assert_allclose(res.kernels, np.broadcast_to(kern, res.kernels.shape), atol=1e-10)
    np.testing.assert_allclose(res.kernels.sum(axis=(1, 2)), kern.sum(), rtol=1e-10)


def test_matches_fftconvolve_orientation() -> None:
    """Away from edges a circular and a 'same' convolution agree; the kernel is not flipped."""
    rng = np.random.default_rng(5)
    kern = l_kernel(7)
    src = rng.standard_normal((1, 64, 64))
    same = fftconvolve(src[0], kern, mode="same")
    circ = circular_convolve(src[0], kern)
    np.testing.assert_allclose(same[5:-5, 5:-5], circ[5:-5, 5:-5], atol=1e-10)


def test_constant_offsets_change_only_background(noise: np.ndarray) -> None:
    kern = l_kernel(9)
    tgt = circular_convolve(noise, kern)
    base = ratio_kernels(noise, tgt, kernel_size=9)
    plus_t = ratio_kernels(noise, tgt + 7.5, kernel_size=9)
    plus_s = ratio_kernels(noise + 3.0, tgt, kernel_size=9)
    np.testing.assert_allclose(plus_t.kernels, base.kernels, atol=1e-10)
    np.testing.assert_allclose(plus_s.kernels, base.kernels, atol=1e-10)
    np.testing.assert_allclose(plus_t.background, base.background + 7.5, atol=1e-9)
    np.testing.assert_allclose(plus_s.background, base.background - 3.0 * kern.sum(), atol=1e-9)
    np.testing.assert_allclose(base.background, 0.0, atol=1e-9)


def test_scaling_target_scales_kernel(noise: np.ndarray) -> None:
    tgt = circular_convolve(noise, l_kernel(9))
    base = ratio_kernels(noise, tgt, kernel_size=9)
    scaled = ratio_kernels(noise, 2.5 * tgt, kernel_size=9)
    np.testing.assert_allclose(scaled.kernels, 2.5 * base.kernels, atol=1e-10)


def test_bad_pixels_ignored_and_all_bad_is_nan(noise: np.ndarray) -> None:
    tgt = circular_convolve(noise, l_kernel(9))
    bad = np.zeros(noise.shape, dtype=bool)
    bad[0, 10:14, 20:30] = True
    bad[2] = True
    src_c, tgt_c = noise.copy(), tgt.copy()
    src_c[bad], tgt_c[bad] = 1e6, -1e6
    clean = ratio_kernels(np.where(bad, 0.0, noise), np.where(bad, 0.0, tgt), bad, kernel_size=9)
    corrupt = ratio_kernels(src_c, tgt_c, bad, kernel_size=9)
    np.testing.assert_allclose(corrupt.kernels[:2], clean.kernels[:2], atol=1e-9)
    assert np.isfinite(corrupt.kernels[:2]).all()
    assert np.isnan(corrupt.kernels[2]).all() and np.isnan(corrupt.background[2])
    # the tile without bad pixels is still exact
    np.testing.assert_allclose(corrupt.kernels[1], l_kernel(9), atol=1e-10)


def test_batch_equals_one_by_one(noise: np.ndarray) -> None:
    tgt = circular_convolve(noise, l_kernel(7)) + np.arange(3)[:, None, None]
    batch = ratio_kernels(noise, tgt, kernel_size=7)
    for i in range(3):
        one = ratio_kernels(noise[i : i + 1], tgt[i : i + 1], kernel_size=7)
        np.testing.assert_allclose(one.kernels[0], batch.kernels[i], atol=1e-12)
        np.testing.assert_allclose(one.background[0], batch.background[i], atol=1e-12)


def test_cross_artifact_on_non_periodic_image() -> None:
    """On a real (non-periodic) tile the error concentrates on the central row and column."""
    rng = np.random.default_rng(0)
    k, h = 21, 10
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    kern = np.exp(-(yy**2 + xx**2) / (2 * 1.5**2))
    kern /= kern.sum()
    ramp = np.linspace(0.0, 20.0, 300)
    canvas = rng.standard_normal((300, 300)) + ramp[None, :] + ramp[:, None]
    conv = fftconvolve(canvas, kern, mode="same")
    src, tgt = canvas[22:150, 22:150][None], conv[22:150, 22:150][None]
    est = ratio_kernels(src, tgt, kernel_size=k).kernels[0]
    off = kern < 1e-8 * kern.max()
    cross = np.zeros((k, k), dtype=bool)
    cross[h, :] = cross[:, h] = True
    contrast = np.mean(est[off & cross] ** 2) / np.mean(est[off & ~cross] ** 2)
    assert contrast > 10.0


def test_options_are_checked(noise: np.ndarray) -> None:
    with pytest.raises(OptionError):
        ratio_kernels(noise, noise, kernel_size=8)
    with pytest.raises(OptionError):
        ratio_kernels(noise, noise, kernel_size=65)
    with pytest.raises(ValueError):
        ratio_kernels(noise, noise[:2], kernel_size=5)


@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.sampled_from([5, 7, 9]),
    seed=st.integers(0, 2**32 - 1),
    offset=st.floats(-100.0, 100.0),
    scale=st.floats(0.1, 10.0),
)
def test_property_random_kernel_recovered(k: int, seed: int, offset: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    kern = rng.standard_normal((k, k))
    src = rng.standard_normal((1, 48, 40))
    tgt = scale * circular_convolve(src, kern) + offset
    res = ratio_kernels(src, tgt, kernel_size=k)
    np.testing.assert_allclose(res.kernels[0], scale * kern, atol=1e-8 * scale * np.abs(kern).max())
    np.testing.assert_allclose(res.background[0], offset, atol=1e-8 * (1 + abs(offset)))
