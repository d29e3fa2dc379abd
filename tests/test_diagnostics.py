"""The per-tile diagnostics' model images (:mod:`pipeline.core.diagnostics`)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from pipeline.core.diagnostics import interior_models, model_images, residual_statistics
from pipeline.core.gram import fit_region


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ny=st.integers(9, 70), nx=st.integers(9, 70), half=st.integers(0, 4))
def test_the_interior_models_are_the_same_convolution_inside(seed, ny, nx, half) -> None:
    k = 2 * half + 1
    rng = np.random.default_rng(seed)
    sources = rng.standard_normal((3, ny, nx))
    kernels = rng.standard_normal((3, k, k))
    kernels[1, 0, 0] = np.nan  # no kernel: no model
    same = np.stack([fftconvolve(s, kern, mode="same") for s, kern in zip(sources, kernels)])
    inner = interior_models(sources, kernels)
    assert inner.shape == (3, ny - 2 * half, nx - 2 * half)
    assert np.isnan(inner[1]).all() and np.isnan(model_images(sources, kernels)[1]).all()
    for i in (0, 2):
        np.testing.assert_allclose(inner[i], same[i, half : ny - half, half : nx - half], atol=1e-10)
        np.testing.assert_allclose(model_images(sources, kernels)[i], same[i], atol=1e-10)


def test_residual_statistics_of_an_exact_model_are_its_noise() -> None:
    # target = K * source + b + white noise of sigma 0.5: noise 0.5, residual 1, signal = std(model) / 0.5,
    # whether the fit region keeps off the edges (the interior models) or reaches them (the padded ones)
    rng = np.random.default_rng(3)
    sources = rng.standard_normal((2, 96, 96)) * 10.0
    kernels = np.stack([np.outer([1, 2, 1], [1, 2, 1]) / 16.0] * 2)
    model = np.stack([fftconvolve(s, kern, mode="same") for s, kern in zip(sources, kernels)])
    targets = model + 3.0 + rng.normal(0.0, 0.5, size=model.shape)
    inner = fit_region(np.zeros(sources.shape, dtype=bool), 3)
    whole = np.ones(sources.shape, dtype=bool)
    for region in (inner, whole):
        noise, residual, signal = residual_statistics(sources, targets, kernels, np.full(2, 3.0), region)
        np.testing.assert_allclose(noise, 0.5, rtol=0.05)
        np.testing.assert_allclose(residual, 1.0, rtol=0.05)
        for i in range(2):
            np.testing.assert_allclose(signal[i], model[i][region[i]].std() / noise[i], rtol=1e-9)


def test_residual_statistics_over_a_region_with_holes_are_those_of_its_pixels() -> None:
    # a region with holes (tiles with bad pixels) gives what its pixels alone give: the MAD of every
    # step-th of them, their RMS and the model's spread over them; a tile without a background has none
    rng = np.random.default_rng(5)
    n, size, k = 11, 64, 5
    sources = rng.standard_normal((n, size, size)) * 10.0
    kernels = rng.random((n, k, k))
    targets = rng.standard_normal((n, size, size)) * 3.0 + 50.0
    bad = rng.random((n, size, size)) < 0.01
    bad[0] = False  # whole tiles and tiles with holes in one batch
    region = fit_region(bad, k)
    targets[bad] = np.nan  # what a bad pixel may hold: never read
    background = rng.normal(50.0, 1.0, n)
    background[3] = np.nan
    max_samples = 500
    noise, residual, signal = residual_statistics(sources, targets, kernels, background, region,
                                                  max_samples=max_samples)
    models = interior_models(sources, kernels)
    h = k // 2
    for i in range(n):
        if i == 3:
            assert np.isnan([noise[i], residual[i], signal[i]]).all()
            continue
        inside = region[i][h:-h, h:-h]
        m = models[i][inside].astype(np.float64)
        r = targets[i][h:-h, h:-h][inside] - m - background[i]
        sample = r[:: max(1, r.size // max_samples)]
        expected = 1.4826 * np.median(np.abs(sample - np.median(sample)))
        np.testing.assert_allclose(noise[i], expected, rtol=1e-12)
        np.testing.assert_allclose(residual[i], np.sqrt(np.mean(r * r)) / expected, rtol=1e-9)
        np.testing.assert_allclose(signal[i], m.std() / expected, rtol=1e-9)
