"""Tests of the kernel profiles and their fit, :mod:`pipeline.core.profiles`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from pipeline.core import profiles
from pipeline.core.profiles import draw, fit_profiles, profile_stamps, start_parameters

K = 15


def moffat(k: int, flux: float, y: float, x: float, cov: np.ndarray, beta: float | None) -> np.ndarray:
    """A profile written out: ``(1 + d' C^-1 d / (2 beta)) ** -beta`` (``beta`` None: the Gaussian)."""
    h = k // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    d = np.stack([yy - y, xx - x], axis=-1)
    q = 0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
    g = np.exp(-q) if beta is None else (1.0 + q / beta) ** (-beta)
    return flux * g / g.sum()


def params_of(flux, y, x, cov, beta) -> np.ndarray:
    p = start_parameters(*(np.array([v]) for v in (flux, y, x, cov[0, 0], cov[1, 1], cov[0, 1])))
    p[0, 6] = 0.0 if beta is None else 1.0 / beta
    return p


covariances = st.tuples(st.floats(0.8, 3.0), st.floats(0.8, 3.0), st.floats(-0.6, 0.6)).map(
    lambda t: np.array([[t[0] ** 2, t[2] * t[0] * t[1]], [t[2] * t[0] * t[1], t[1] ** 2]]))


@settings(max_examples=40, deadline=None)
@given(flux=st.floats(0.1, 10.0), y=st.floats(-2.0, 2.0), x=st.floats(-2.0, 2.0), cov=covariances,
       beta=st.one_of(st.none(), st.floats(1.5, 20.0)))
def test_profile_is_the_written_out_one(flux, y, x, cov, beta) -> None:
    """Gaussian and Moffat profiles on the stamp, summing to their flux."""
    got = profile_stamps(params_of(flux, y, x, cov, beta), K, moffat=beta is not None)[0]
    want = moffat(K, flux, y, x, cov, beta)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13 * flux)
    assert got.sum() == pytest.approx(flux)


def test_profiles_of_either_kind_are_drawn_as_their_kind() -> None:
    """A batch of Gaussian (``nu`` 0) and Moffat profiles: each as :func:`profile_stamps` of its own kind."""
    cov = np.array([[2.0, 0.3], [0.3, 1.5]])
    batch = np.concatenate([params_of(1.0, 0.3, -0.2, cov, beta) for beta in (None, 2.5, None, 4.0)])
    got = draw(batch, K)
    for i, beta in enumerate((None, 2.5, None, 4.0)):
        np.testing.assert_array_equal(got[i], profile_stamps(batch[i:i + 1], K, moffat=beta is not None)[0])


def test_a_steep_moffat_profile_is_the_gaussian() -> None:
    cov = np.array([[2.0, 0.3], [0.3, 1.5]])
    p = params_of(1.0, 0.3, -0.2, cov, None)
    gauss = profile_stamps(p, K, moffat=False)
    p[0, 6] = 1e-4
    np.testing.assert_allclose(profile_stamps(p, K, moffat=True), gauss, atol=1e-4 * gauss.max())


@settings(max_examples=25, deadline=None)
@given(flux=st.floats(0.5, 2.0), y=st.floats(-1.0, 1.0), x=st.floats(-1.0, 1.0), cov=covariances,
       beta=st.one_of(st.none(), st.floats(2.0, 10.0)))
def test_jacobian_is_the_finite_difference(flux, y, x, cov, beta) -> None:
    moffat_ = beta is not None
    p = params_of(flux, y, x, cov, beta)
    gains = np.random.default_rng(0).uniform(0.5, 1.0, (1, K, K))
    jac = profiles._jacobian(p, gains, moffat_)[1]
    for j in range(jac.shape[1]):
        step = 1e-6 * max(1.0, abs(p[0, j]))
        up, down = p.copy(), p.copy()
        up[0, j] += step
        down[0, j] -= step
        numeric = (profiles._jacobian(up, gains, moffat_)[0] - profiles._jacobian(down, gains, moffat_)[0]) / (2 * step)
        np.testing.assert_allclose(jac[0, j], numeric[0], rtol=1e-5, atol=1e-6 * np.abs(jac[0, j]).max() + 1e-12)


def blur_normal(widths: np.ndarray):
    """Each tile's ``M``: a Gaussian blur's normal operator (``B' B``) on the stamp, as an explicit matrix."""
    h = K // 2
    lag = np.arange(-h, h + 1)
    mats = []
    for s in widths:
        b = np.exp(-0.5 * (lag[:, None] - lag[None, :]) ** 2 / s**2)
        b2 = np.kron(b, b) + 0.05 * np.eye(K * K)
        mats.append(b2.T @ b2)
    mats = np.stack(mats)

    def normal(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        m, p = x.shape[:2]
        flat = x.reshape(m, p, K * K)
        return np.einsum("rij,rpj->rpi", mats[rows], flat).reshape(m, p, K, K)

    return normal, mats


@pytest.mark.parametrize("beta", [None, 3.0])
def test_fit_recovers_the_profile_of_an_exact_quadratic(beta) -> None:
    """``b = M H_true``: the minimiser is ``H_true``; from a start off by 20-30 % the fit finds its parameters."""
    truths = [(1.3, 0.4, -0.3, np.array([[2.0, 0.3], [0.3, 1.4]])),
              (0.8, -0.6, 0.2, np.array([[1.2, -0.2], [-0.2, 2.2]]))]
    gains = np.random.default_rng(1).uniform(0.7, 1.0, (2, K, K))
    normal, _ = blur_normal(np.array([1.0, 1.7]))
    true_p = np.concatenate([params_of(f, y, x, c, beta) for f, y, x, c in truths])
    h_true = profile_stamps(true_p, K, moffat=beta is not None) * gains
    rhs = normal(h_true[:, None], np.arange(2))[:, 0]
    start = np.concatenate([params_of(f * 1.2, y + 0.3, x - 0.2, c * 1.3, None) for f, y, x, c in truths])
    if beta is not None:
        start[:, 6] = 0.05
    got, stamps, value = fit_profiles(normal, rhs, gains, start, moffat=beta is not None, iterations=40)
    np.testing.assert_allclose(got, true_p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stamps, h_true, atol=1e-6 * h_true.max())
    np.testing.assert_allclose(value, -np.einsum("nij,nij->n", h_true, rhs), rtol=1e-8)


def test_fit_agrees_with_a_general_minimiser() -> None:
    """A quadratic whose minimum is no profile: the fitted Gaussian is scipy's minimiser of the same form."""
    rng = np.random.default_rng(3)
    normal, mats = blur_normal(np.array([1.3]))
    target = moffat(K, 1.0, 0.2, -0.1, np.array([[1.5, 0.2], [0.2, 1.1]]), 2.5) + 0.002 * rng.standard_normal((K, K))
    rhs = normal(target[None, None], np.arange(1))[:, 0]
    gains = np.ones((1, K, K))
    start = params_of(0.9, 0.0, 0.0, np.eye(2) * 2.0, None)
    got, _, value = fit_profiles(normal, rhs, gains, start, moffat=False, iterations=30)

    def form(theta: np.ndarray) -> float:
        p = start.copy()
        p[0, :6] = theta
        hh = profile_stamps(p, K, moffat=False)[0].ravel()
        return float(hh @ mats[0] @ hh - 2 * rhs[0].ravel() @ hh)

    best = minimize(form, got[0, :6] * 1.05, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-14,
                                                                              "maxiter": 20000, "maxfev": 20000})
    assert value[0] <= best.fun + 1e-9 * abs(best.fun)
    np.testing.assert_allclose(got[0, :6], best.x, rtol=1e-3, atol=1e-4)


def test_each_tile_is_fitted_on_its_own() -> None:
    """A tile that starts at its minimum stays there while another in the batch is fitted; both are the
    one-tile fits."""
    normal, _ = blur_normal(np.array([1.0, 1.5]))
    p = np.concatenate([params_of(1.0, 0.0, 0.0, np.eye(2) * 1.5, None), params_of(0.7, 0.5, -0.4, np.eye(2), None)])
    gains = np.ones((2, K, K))
    rhs = normal(profile_stamps(p, K, moffat=False)[:, None], np.arange(2))[:, 0]
    start = p.copy()
    start[1, :3] = (1.0, 0.0, 0.0)
    got, _, _ = fit_profiles(normal, rhs, gains, start, moffat=False, iterations=20)
    np.testing.assert_allclose(got[0], p[0], atol=1e-10)
    np.testing.assert_allclose(got[1], p[1], rtol=1e-5, atol=1e-6)

    def alone(rows: np.ndarray):
        return lambda x, sub: normal(x, rows[sub])

    for i in range(2):
        one = fit_profiles(alone(np.array([i])), rhs[i:i + 1], gains[i:i + 1], start[i:i + 1], moffat=False,
                           iterations=20)[0]
        np.testing.assert_allclose(got[i], one[0], rtol=1e-12, atol=1e-14)


def test_moffat_gain_predicts_what_the_moffat_fit_finds() -> None:
    """From the Gaussian fit: where the data are a Gaussian, nothing to gain; where they are a Moffat profile
    (beta 4 and 2.5), the predicted gain is within a factor 3 of what the Moffat fit then finds, and the
    Moffat fit finds its beta."""
    normal, _ = blur_normal(np.array([1.2, 1.2, 1.2]))
    cov = np.array([[1.8, 0.2], [0.2, 1.3]])
    truths = [params_of(1.0, 0.2, -0.1, cov, beta) for beta in (None, 4.0, 2.5)]
    gains = np.ones((3, K, K))
    data = np.concatenate([profile_stamps(p, K, moffat=p[0, 6] > 0) for p in truths])
    rhs = normal(data[:, None], np.arange(3))[:, 0]
    start = np.concatenate([params_of(1.0, 0.0, 0.0, cov, None)] * 3)
    gauss, _, g_value = fit_profiles(normal, rhs, gains, start, moffat=False, iterations=30)
    predicted = profiles.moffat_gain(normal, rhs, gains, gauss)
    at = gauss.copy()
    at[:, 6] = 0.05
    moffat_, _, m_value = fit_profiles(normal, rhs, gains, at, moffat=True, iterations=60)
    found = g_value - m_value
    assert predicted[0] <= 1e-9 * abs(g_value[0]) and found[0] <= 1e-9 * abs(g_value[0])
    assert np.all((predicted[1:] > found[1:] / 3) & (predicted[1:] < 3 * found[1:]))
    np.testing.assert_allclose(moffat_[1:, 6], [0.25, 0.4], rtol=1e-3)


def test_a_degenerate_tile_does_not_stop_the_others() -> None:
    """A tile whose ``M`` is zero (no information) has singular steps; the other tile of the batch is fitted
    all the same, and the degenerate one keeps a valid profile."""
    normal, _ = blur_normal(np.array([1.0, 1.0]))

    def some_blind(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = normal(x, rows)
        out[rows == 0] = 0.0
        return out

    p = np.concatenate([params_of(1.0, 0.0, 0.0, np.eye(2) * 1.5, None), params_of(0.7, 0.5, -0.4, np.eye(2), None)])
    gains = np.ones((2, K, K))
    rhs = normal(profile_stamps(p, K, moffat=False)[:, None], np.arange(2))[:, 0]
    rhs[0] = 0.0
    start = p.copy()
    start[:, :3] = (0.9, 0.1, 0.1)
    got, _, _ = fit_profiles(some_blind, rhs, gains, start, moffat=False, iterations=20)
    np.testing.assert_allclose(got[1], p[1], rtol=1e-5, atol=1e-6)
    assert profiles._valid(got, K, False).all()
