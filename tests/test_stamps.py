"""Pruned transforms of kernel stamps: the full transforms' values."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.stamps import stamp_lags, stamp_spectra


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), half=st.integers(0, 6), extra=st.tuples(st.integers(0, 20), st.integers(0, 20)),
       single=st.booleans())
def test_pruned_stamp_transforms_are_the_full_ones(seed, half, extra, single) -> None:
    rng = np.random.default_rng(seed)
    k = 2 * half + 1
    shape = (k + extra[0], k + extra[1])
    dtype = np.float32 if single else np.float64
    stamps = rng.standard_normal((3, k, k)).astype(dtype)
    tol = 1e-5 if single else 1e-12
    spectra = stamp_spectra(stamps, shape)
    full = sfft.rfft2(stamps, s=shape)
    assert spectra.shape == full.shape and spectra.dtype == full.dtype
    np.testing.assert_allclose(spectra, full, atol=tol * np.abs(full).max())
    wide = (rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape)).astype(full.dtype)
    expected = sfft.irfft2(wide, s=shape)[:, :k, :k]
    got = stamp_lags(wide.copy(), shape, k)
    assert got.shape == (3, k, k) and got.flags.c_contiguous and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, atol=tol * np.abs(expected).max())
