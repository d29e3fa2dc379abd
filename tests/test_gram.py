"""The fast valid-region Gram equals the explicit design-matrix product."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.fft import rfft2

from pipeline.core.gram import dense_gram, design_rows, fft_shape, valid_gram


@settings(max_examples=30)
@given(
    half=st.integers(1, 5),
    extra_y=st.integers(1, 30),
    extra_x=st.integers(1, 30),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_valid_gram_matches_dense_product(half, extra_y, extra_x, n, seed):
    k = 2 * half + 1
    rng = np.random.default_rng(seed)
    sources = rng.normal(size=(n, 2 * k + extra_y, 2 * k + extra_x)) + rng.normal()
    fast = valid_gram(sources, half)
    for i in range(n):
        ref = dense_gram(sources[i], half)
        np.testing.assert_allclose(fast[i], ref, rtol=0, atol=1e-11 * np.abs(ref).max())


def test_valid_gram_is_symmetric_positive_definite():
    rng = np.random.default_rng(3)
    gram = valid_gram(rng.normal(size=(2, 64, 64)), 5)
    np.testing.assert_allclose(gram, gram.transpose(0, 2, 1), atol=1e-9)
    assert np.all(np.linalg.eigvalsh(gram) > 0)


def test_plain_autocorrelation_is_not_the_valid_gram():
    """The boundary terms matter: a Toeplitz Gram from the full autocorrelation differs."""
    rng = np.random.default_rng(4)
    src = rng.normal(size=(40, 40)) + 5.0
    half = 4
    k = 2 * half + 1
    full = np.zeros((k * k, k * k))
    padded = np.pad(src, 2 * half)
    for a in range(k * k):
        for b in range(k * k):
            dy = a // k - b // k
            dx = a % k - b % k
            shifted = padded[2 * half + dy : 2 * half + dy + 40, 2 * half + dx : 2 * half + dx + 40]
            full[a, b] = np.sum(src * shifted)
    exact = valid_gram(src[None], half)[0]
    assert np.abs(full - exact).max() > 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("half", [1, 3])
def test_design_rows_follow_the_convolution_convention(half):
    k = 2 * half + 1
    rng = np.random.default_rng(5)
    src = rng.normal(size=(20, 24))
    kernel = rng.normal(size=(k, k))
    from scipy.signal import fftconvolve

    tgt = fftconvolve(src, kernel, mode="same")
    yy, xx = np.mgrid[half : 20 - half, half : 24 - half]
    rows = design_rows(src, half, (yy.ravel(), xx.ravel()))
    np.testing.assert_allclose(rows @ kernel.ravel(), tgt[half : 20 - half, half : 24 - half].ravel(), atol=1e-10)


@pytest.mark.parametrize(("shape", "half"), [((3, 3), 1), ((3, 4), 1), ((8, 5), 2), ((21, 22), 10), ((64, 75), 10)])
def test_valid_gram_small_and_default_half_tiles(shape, half):
    """Edge bands that overlap (a one-pixel valid box) and the default kernel on non-square tiles."""
    rng = np.random.default_rng(6)
    sources = rng.normal(size=(2, *shape)) + 2.0
    fast = valid_gram(sources, half)
    assert fast.shape == (2, (2 * half + 1) ** 2, (2 * half + 1) ** 2)
    assert fast.dtype == np.float64 and fast.flags.c_contiguous
    for i in range(2):
        ref = dense_gram(sources[i], half)
        np.testing.assert_allclose(fast[i], ref, rtol=0, atol=1e-11 * np.abs(ref).max())


def test_valid_gram_reuses_given_spectra():
    rng = np.random.default_rng(7)
    sources = rng.normal(size=(3, 30, 26))
    spectra = rfft2(sources, s=fft_shape((30, 26), 3))
    np.testing.assert_array_equal(valid_gram(sources, 3, spectra=spectra), valid_gram(sources, 3))
