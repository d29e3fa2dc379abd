"""The variance of a resampled pixel: the sum of the squared weights reproject's bicubic interpolation gives
the input pixels, everywhere, edges included."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("reproject")
from astropy.wcs import WCS
from scipy.ndimage import map_coordinates

from pipeline.io.resample import (
    axis_noise_factor,
    resample_onto,
    resampling_noise_factor,
    spline_noise_factor,
)


def _wcs(crpix: tuple[float, float], angle: float = 0.0, scale: float = 1e-4) -> WCS:
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [30.0, -10.0]
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cd = np.array([[-scale * c, scale * s], [scale * s, scale * c]])
    return wcs


@pytest.mark.parametrize("n", [1, 2, 5, 17, 40, 90, 300])
def test_the_axis_factor_is_the_sum_of_the_squared_weights_of_each_input_pixel_edges_included(n):
    rng = np.random.default_rng(n)
    p = np.concatenate([rng.uniform(-0.5, n - 0.5, 400), [0.0, n - 1.0, -0.25, n - 0.75, -0.5, n - 0.5]])
    clipped = np.clip(p, 0, n - 1)  # reproject takes positions within half a pixel of the ends onto them
    truth = np.zeros(len(p))
    for k in range(n):
        impulse = np.zeros(n)
        impulse[k] = 1.0
        truth += map_coordinates(impulse, clipped[None, :], order=3, mode="constant", cval=0.0) ** 2
    np.testing.assert_allclose(axis_noise_factor(p, n), truth, rtol=2e-5, atol=1e-7)
    assert np.isnan(axis_noise_factor(np.array([-0.6, n - 0.4, np.nan]), n)).all()  # not covered


def test_the_noise_factor_is_what_reproject_does_to_each_input_pixel_over_the_whole_image():
    """Each input pixel's impulse resampled by reproject itself: the sum of their squares at every output
    pixel it covers (the edges, where the spline's boundary and reproject's half-pixel rule change the
    weights, included) is the factor the variances are multiplied by."""
    from reproject import reproject_interp

    shape_in, shape = (14, 19), (16, 21)
    wcs_in, wcs_out = _wcs((10.0, 7.5), angle=4.0), _wcs((11.7, 9.2))
    truth = np.zeros(shape)
    covered = np.zeros(shape, dtype=bool)
    for k in range(shape_in[0] * shape_in[1]):
        impulse = np.zeros(shape_in)
        impulse.flat[k] = 1.0
        out, footprint = reproject_interp((impulse, wcs_in), wcs_out, shape_out=shape, order="bicubic")
        covered |= footprint > 0
        truth += np.nan_to_num(out) ** 2
    factor = resampling_noise_factor(wcs_in, wcs_out, shape, shape_in)
    assert covered.sum() > 0.6 * covered.size and (~covered).any()
    np.testing.assert_allclose(factor[covered], truth[covered], rtol=1e-4)
    assert np.isnan(factor[~covered]).all()
    assert truth[covered].min() < 0.5 and truth[covered].max() > 0.9  # the factor does vary


def test_resampled_variances_carry_the_factor_up_to_the_edges():
    """A uniform variance resampled: the factor itself at every good pixel, the first and last columns too."""
    shape = (12, 16)
    wcs_in, wcs_out = _wcs((8.0, 6.0)), _wcs((8.4, 6.3))  # 0.4 px along x, 0.3 px along y
    data = np.ones(shape)
    _, bad, variance = resample_onto(data, None, np.full(shape, 4.0), wcs_in, wcs_out, shape)
    good = ~bad
    expected = 4.0 * resampling_noise_factor(wcs_in, wcs_out, shape, shape)
    np.testing.assert_allclose(variance[good], expected[good], rtol=1e-6)
    assert good[1:, 0].all() and good[1:, -1].all()
    # inside, the spline's factor of the offsets; the first and last columns, at the input's edges, differ
    middle = variance[6, 8] / 4.0
    assert middle == pytest.approx(float(spline_noise_factor(0.3) * spline_noise_factor(0.4)), rel=1e-4)
    assert abs(variance[6, 0] / 4.0 / middle - 1) > 0.05 and abs(variance[6, -1] / 4.0 / middle - 1) > 0.05
