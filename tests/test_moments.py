"""Tests of adaptive second moments against exact analytic expectations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.moments import FWHM_PER_SIGMA, Moments, adaptive_moments
from pipeline.errors import InputError, OptionError


def sampled_gaussian(size: int, cov: np.ndarray, cy: float = 0.0, cx: float = 0.0,
                     amplitude: float = 1.0) -> np.ndarray:
    """Gaussian of covariance ``cov`` (y, x order) centred at ``size//2 + (cy, cx)``."""
    g = np.arange(size, dtype=np.float64) - size // 2
    y, x = np.meshgrid(g - cy, g - cx, indexing="ij")
    inv = np.linalg.inv(cov)
    rho2 = inv[0, 0] * y * y + 2.0 * inv[0, 1] * y * x + inv[1, 1] * x * x
    return amplitude * np.exp(-0.5 * rho2)


def cov_from_shape(fwhm: float, e1: float, e2: float) -> np.ndarray:
    sigma2 = (fwhm / FWHM_PER_SIGMA) ** 2
    half_trace = sigma2 / math.sqrt(1.0 - e1 * e1 - e2 * e2)
    return np.array([[half_trace * (1.0 - e1), half_trace * e2],
                     [half_trace * e2, half_trace * (1.0 + e1)]])


def aliasing_bound(fwhm: float, e: float) -> float:
    """Size of the sampling error of moments of a point-sampled Gaussian.

    The weighted stamp is a Gaussian of half the covariance; its sampled
    second moments differ from the continuous ones by about
    ``8 pi^2 s exp(-2 pi^2 s)`` with ``s`` its variance along the minor axis.
    """
    minor = (fwhm / FWHM_PER_SIGMA) ** 2 * math.sqrt((1.0 - e) / (1.0 + e))
    s = 0.5 * minor
    return 8.0 * math.pi ** 2 * s * math.exp(-2.0 * math.pi ** 2 * s)


@pytest.mark.parametrize(
    ("cov", "cy", "cx"),
    [
        ([[4.0, 0.0], [0.0, 4.0]], 0.0, 0.0),
        ([[4.0, 0.7], [0.7, 3.1]], 0.3, -0.41),
        ([[5.5, -1.2], [-1.2, 4.0]], -0.5, 0.5),
        ([[4.2, 0.0], [0.0, 7.3]], 1.25, -2.75),
        ([[6.0, 2.0], [2.0, 5.0]], 0.123, 0.877),
    ],
)
def test_sampled_gaussian_is_exact(cov: list[list[float]], cy: float, cx: float) -> None:
    cov_a = np.array(cov)
    m = adaptive_moments(sampled_gaussian(31, cov_a, cy, cx, amplitude=3.7))
    assert m.converged
    np.testing.assert_allclose([m.myy, m.mxy, m.mxx], [cov_a[0, 0], cov_a[0, 1], cov_a[1, 1]],
                               rtol=1e-6, atol=1e-6 * np.trace(cov_a))
    np.testing.assert_allclose([m.y, m.x], [cy, cx], rtol=0, atol=1e-6)
    det = np.linalg.det(cov_a)
    assert m.sigma == pytest.approx(det ** 0.25, rel=1e-6)
    assert m.fwhm == pytest.approx(FWHM_PER_SIGMA * det ** 0.25, rel=1e-6)
    tr = cov_a[0, 0] + cov_a[1, 1]
    assert m.e1 == pytest.approx((cov_a[1, 1] - cov_a[0, 0]) / tr, abs=1e-6)
    assert m.e2 == pytest.approx(2.0 * cov_a[0, 1] / tr, abs=1e-6)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    fwhm=st.floats(2.0, 6.0),
    e_frac=st.floats(0.0, 1.0),
    angle=st.floats(0.0, math.pi),
    cy=st.floats(-0.5, 0.5),
    cx=st.floats(-0.5, 0.5),
)
def test_recovers_shape_of_sampled_gaussians(fwhm: float, e_frac: float, angle: float,
                                             cy: float, cx: float) -> None:
    # Up to e = 0.3, restricted so the minor axis stays at least as well sampled
    # as a round FWHM = 2 px Gaussian (sigma_minor >= 0.85 px).
    sigma2 = (fwhm / FWHM_PER_SIGMA) ** 2
    r = min(1.0, 0.72 / sigma2)
    e = e_frac * min(0.3, (1.0 - r * r) / (1.0 + r * r))
    e1, e2 = e * math.cos(2.0 * angle), e * math.sin(2.0 * angle)
    stamp = sampled_gaussian(41, cov_from_shape(fwhm, e1, e2), cy, cx)
    m = adaptive_moments(stamp)
    tol = 1e-7 + 10.0 * aliasing_bound(fwhm, e)
    assert m.converged
    assert abs(m.fwhm / fwhm - 1.0) < tol
    assert abs(m.e1 - e1) < tol
    assert abs(m.e2 - e2) < tol
    assert abs(m.y - cy) < tol
    assert abs(m.x - cx) < tol
    assert m.ellipticity == pytest.approx(math.hypot(m.e1, m.e2))


def test_flux_is_plain_sum_and_dtypes() -> None:
    rng = np.random.default_rng(3)
    stamps = rng.normal(0.0, 1.0, (4, 9, 11)) + sampled_gaussian(11, np.eye(2) * 2.0)[1:10]
    m = adaptive_moments(stamps.astype(np.float32))
    expected = stamps.astype(np.float32).astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(m.flux, expected)
    for name in Moments.__dataclass_fields__:
        value = getattr(m, name)
        assert value.shape == (4,)
        assert value.dtype == (np.bool_ if name == "converged" else np.float64)
    ints = (1000 * sampled_gaussian(15, np.eye(2) * 3.0)).astype(np.int64)
    mi = adaptive_moments(ints)
    assert mi.flux == ints.sum()
    assert mi.converged


def test_single_stamp_gives_zero_dim_outputs() -> None:
    m = adaptive_moments(sampled_gaussian(21, np.eye(2) * 3.0))
    for name in Moments.__dataclass_fields__:
        assert np.shape(getattr(m, name)) == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.flux = np.array(1.0)  # type: ignore[misc]  # frozen


def test_batch_equals_one_by_one() -> None:
    rng = np.random.default_rng(11)
    stamps = []
    for _ in range(12):
        cov = cov_from_shape(rng.uniform(2.5, 5.0), *rng.uniform(-0.2, 0.2, 2))
        s = sampled_gaussian(21, cov, *rng.uniform(-1.0, 1.0, 2))
        stamps.append(s + rng.normal(0.0, 0.02, s.shape))
    stamps.append(np.zeros((21, 21)))  # fails
    stamps = np.array(stamps)
    batch = adaptive_moments(stamps)
    for i, s in enumerate(stamps):
        one = adaptive_moments(s)
        for name in Moments.__dataclass_fields__:
            np.testing.assert_allclose(getattr(batch, name)[i], getattr(one, name),
                                       rtol=1e-12, atol=0, equal_nan=True)
    assert batch.converged[:-1].all() and not batch.converged[-1]


def test_nan_stamp_gives_nan_everything() -> None:
    good = sampled_gaussian(15, np.eye(2) * 3.0)
    bad = good.copy()
    bad[3, 4] = np.nan
    m = adaptive_moments(np.stack([good, bad, good]))
    assert m.converged.tolist() == [True, False, True]
    for name in Moments.__dataclass_fields__:
        if name != "converged":
            assert np.isnan(getattr(m, name)[1]), name
            assert np.isfinite(getattr(m, name)[[0, 2]]).all(), name
    single = adaptive_moments(bad)
    assert np.isnan(single.flux) and not single.converged


@pytest.mark.parametrize(
    "stamp",
    [
        np.zeros((15, 15)),
        -sampled_gaussian(15, np.eye(2) * 3.0),
        np.pad(np.ones((1, 1)), 7),   # a delta: no fixed point on the pixel grid
        np.pad(np.ones((1, 5)), 7),   # a one-row bar: degenerate covariance
    ],
    ids=["zero", "negative", "delta", "bar"],
)
def test_failures_give_nan_shape_and_plain_flux(stamp: np.ndarray) -> None:
    m = adaptive_moments(stamp)
    assert not m.converged
    assert m.flux == pytest.approx(stamp.sum())
    for name in ("y", "x", "myy", "mxx", "mxy", "sigma", "fwhm", "e1", "e2", "ellipticity"):
        assert np.isnan(getattr(m, name)), name


def test_not_converged_within_max_iter() -> None:
    stamp = sampled_gaussian(21, np.array([[3.0, 0.5], [0.5, 2.0]]), 0.2, 0.1)
    assert not adaptive_moments(stamp, max_iter=1).converged
    assert np.isnan(adaptive_moments(stamp, max_iter=1).sigma)
    assert adaptive_moments(stamp, max_iter=3).converged


def test_robust_to_noise_in_the_wings() -> None:
    rng = np.random.default_rng(2024)
    fwhm = 4.0
    clean = sampled_gaussian(21, cov_from_shape(fwhm, 0.0, 0.0))
    noisy = clean + 0.01 * rng.standard_normal((200, 21, 21))  # 1% of the peak
    m = adaptive_moments(noisy)
    assert m.converged.all()
    assert np.max(np.abs(m.fwhm / fwhm - 1.0)) < 0.02
    assert np.max(np.abs([m.y, m.x])) < 0.05
    # The unweighted width of the same stamps is far noisier.
    g = np.arange(21) - 10.0
    unweighted = (noisy * g[None, None, :] ** 2).sum(axis=(1, 2)) / noisy.sum(axis=(1, 2))
    assert np.std(np.sqrt(np.abs(unweighted)) * FWHM_PER_SIGMA / fwhm) > 5 * np.std(m.fwhm / fwhm)


def test_orientation_conventions() -> None:
    wide_x = adaptive_moments(sampled_gaussian(31, np.diag([2.0, 5.0])))
    assert wide_x.e1 > 0 and abs(wide_x.e2) < 1e-12
    # Elongated along y = x (rows down, columns right): positive xy covariance.
    diag = adaptive_moments(sampled_gaussian(31, np.array([[4.0, 2.0], [2.0, 4.0]])))
    assert diag.e2 == pytest.approx(0.5, abs=1e-6) and diag.mxy > 0
    shifted = adaptive_moments(sampled_gaussian(31, np.eye(2) * 4.0, 2.0, -3.0))
    assert (shifted.y, shifted.x) == (pytest.approx(2.0, abs=1e-9), pytest.approx(-3.0, abs=1e-9))


def test_symmetries_of_a_non_gaussian_stamp() -> None:
    # An asymmetric stamp: two offset Gaussians of different flux and width.
    stamp = (sampled_gaussian(25, np.array([[3.0, 0.8], [0.8, 2.0]]), 1.0, -0.5)
             + 0.4 * sampled_gaussian(25, np.eye(2) * 2.5, -1.5, 2.0))
    m = adaptive_moments(stamp)
    t = adaptive_moments(stamp.T)
    f = adaptive_moments(stamp[::-1])
    assert m.converged and t.converged and f.converged
    np.testing.assert_allclose([t.y, t.x, t.myy, t.mxx, t.mxy],
                               [m.x, m.y, m.mxx, m.myy, m.mxy], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose([f.y, f.x, f.myy, f.mxx, f.mxy],
                               [-m.y, m.x, m.myy, m.mxx, -m.mxy], rtol=1e-6, atol=1e-8)
    # Derived quantities follow their definitions.
    assert m.sigma == pytest.approx((m.myy * m.mxx - m.mxy ** 2) ** 0.25)
    assert m.fwhm == pytest.approx(FWHM_PER_SIGMA * m.sigma)
    assert m.e1 == pytest.approx((m.mxx - m.myy) / (m.mxx + m.myy))
    assert m.e2 == pytest.approx(2 * m.mxy / (m.mxx + m.myy))


def test_even_and_rectangular_stamps_use_centre_index() -> None:
    m = adaptive_moments(sampled_gaussian(31, np.eye(2) * 4.0, 0.25, -0.5)[3:27, 2:31])
    # The slice puts the original centre (15, 15) at (12, 13); the centre index
    # of the (24, 29) stamp is (12, 14).
    assert m.converged
    assert m.y == pytest.approx(0.25, abs=1e-6)
    assert m.x == pytest.approx(-1.5, abs=1e-6)


def test_empty_batch() -> None:
    m = adaptive_moments(np.zeros((0, 7, 7)))
    assert m.flux.shape == (0,) and m.converged.shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(5), np.zeros((2, 2, 5, 5)), np.zeros((5, 0)), np.zeros((5, 5), complex),
     np.zeros((5, 5), bool), np.array([["a"]])],
)
def test_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(InputError):
        adaptive_moments(bad)


@pytest.mark.parametrize(("max_iter", "tol"), [(0, 1e-6), (1.5, 1e-6), (True, 1e-6),
                                               (10, 0.0), (10, -1.0), (10, np.nan)])
def test_bad_options(max_iter: object, tol: object) -> None:
    with pytest.raises(OptionError):
        adaptive_moments(np.ones((5, 5)), max_iter=max_iter, tol=tol)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, database=None)
@given(fwhm=st.floats(2.5, 7.0), e1=st.floats(-0.3, 0.3), e2=st.floats(-0.3, 0.3),
       cy=st.floats(-1.0, 1.0), cx=st.floats(-1.0, 1.0), noise=st.floats(0.0, 0.02),
       seed=st.integers(0, 2**32 - 1))
def test_a_warm_start_reaches_the_same_moments(fwhm, e1, e2, cy, cx, noise, seed) -> None:
    """Started from the moments of other stamps (a neighbour's, a slightly different kernel's), the
    iteration stops at the same fixed point, to its tolerance, in at most as many steps."""
    rng = np.random.default_rng(seed)
    stamps = np.stack([sampled_gaussian(21, cov_from_shape(fwhm, e1, e2), cy, cx),
                       sampled_gaussian(21, cov_from_shape(fwhm * 1.1, -e1, e2), -cy, cx)])
    stamps = stamps + noise * rng.standard_normal(stamps.shape)
    cold = adaptive_moments(stamps)
    other = adaptive_moments(stamps[::-1] * 2.0)
    warm = adaptive_moments(stamps, start=other)
    np.testing.assert_array_equal(warm.converged, cold.converged)
    for name in ("y", "x", "myy", "mxx", "mxy"):
        np.testing.assert_allclose(getattr(warm, name), getattr(cold, name), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(warm.flux, cold.flux)
    own = adaptive_moments(stamps, start=cold, max_iter=2)  # from the fixed point itself: at once
    np.testing.assert_array_equal(own.converged, cold.converged)


def test_a_warm_start_must_hold_one_set_per_stamp() -> None:
    m = adaptive_moments(np.ones((3, 5, 5)))
    with pytest.raises(OptionError, match="moments of 2 stamps"):
        adaptive_moments(np.ones((2, 5, 5)), start=m)
