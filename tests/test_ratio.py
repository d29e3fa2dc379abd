"""Tests of the textbook ratio estimator, :func:`pipeline.core.ratio.ratio_kernels`."""

from __future__ import annotations

import numpy as np
import pytest
from kernels import l_kernel
from scipy.signal import fftconvolve

from pipeline.core.ratio import RatioResult, ratio_kernels
from pipeline.errors import OptionError


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((3, 64, 64))


def test_result_type_and_exact_periodic_kernel(noise: np.ndarray) -> None:
    """The invariants shared with the other methods are in test_conventions.py; this is the raw call."""
    kern = l_kernel(9)
    tgt = np.real(np.fft.ifft2(np.fft.fft2(noise) * np.fft.fft2(
        np.roll(np.pad(kern, ((0, 55), (0, 55))), (-4, -4), axis=(0, 1)))))
    res = ratio_kernels(noise, tgt, kernel_size=9)
    assert isinstance(res, RatioResult)
    assert res.kernels.shape == (3, 9, 9) and res.kernels.dtype == np.float64
    np.testing.assert_allclose(res.kernels, np.broadcast_to(kern, res.kernels.shape), atol=1e-10)
    np.testing.assert_allclose(res.background, 0.0, atol=1e-9)


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

