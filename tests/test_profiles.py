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


def two_gaussians(k: int, flux: float, y: float, x: float, cov: np.ndarray, phi: float, s: float) -> np.ndarray:
    """Two Gaussians written out: ``1 - phi`` of the light in one of covariance ``C``, ``phi`` in one of
    ``s**2 C``, about one centre (each normalised on the plane), the sum scaled to ``flux`` on the stamp."""
    h = k // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    d = np.stack([yy - y, xx - x], axis=-1)

    def gaussian(c: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(c), d)) / np.sqrt(np.linalg.det(c))

    g = (1.0 - phi) * gaussian(cov) + phi * gaussian(s**2 * cov)
    return flux * g / g.sum()


def params_of(flux, y, x, cov, beta, wing: tuple[float, float] | None = None) -> np.ndarray:
    """Parameters of a Gaussian, a Moffat profile (``beta``) or two Gaussians (``wing``: ``(phi, s)``)."""
    p = start_parameters(*(np.array([v]) for v in (flux, y, x, cov[0, 0], cov[1, 1], cov[0, 1])))
    p[0, 6] = 0.0 if beta is None else 1.0 / beta
    if wing is not None:
        p[0, 7:] = wing
    return p


def kind_of(beta, wing=None) -> str:
    return "two_gaussians" if wing is not None else "gaussian" if beta is None else "moffat"


covariances = st.tuples(st.floats(0.8, 3.0), st.floats(0.8, 3.0), st.floats(-0.6, 0.6)).map(
    lambda t: np.array([[t[0] ** 2, t[2] * t[0] * t[1]], [t[2] * t[0] * t[1], t[1] ** 2]]))


@settings(max_examples=40, deadline=None)
@given(flux=st.floats(0.1, 10.0), y=st.floats(-2.0, 2.0), x=st.floats(-2.0, 2.0), cov=covariances,
       beta=st.one_of(st.none(), st.floats(1.5, 20.0)))
def test_profile_is_the_written_out_one(flux, y, x, cov, beta) -> None:
    """Gaussian and Moffat profiles on the stamp, summing to their flux."""
    got = profile_stamps(params_of(flux, y, x, cov, beta), K, kind=kind_of(beta))[0]
    want = moffat(K, flux, y, x, cov, beta)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13 * flux)
    assert got.sum() == pytest.approx(flux)


@settings(max_examples=40, deadline=None)
@given(flux=st.floats(0.1, 10.0), y=st.floats(-2.0, 2.0), x=st.floats(-2.0, 2.0), cov=covariances,
       phi=st.floats(1e-3, 0.9), s=st.floats(1.2, 6.0))
def test_two_gaussians_are_the_written_out_ones(flux, y, x, cov, phi, s) -> None:
    """A core and a wing about it: the written-out mixture on the stamp, summing to its flux."""
    got = profile_stamps(params_of(flux, y, x, cov, None, (phi, s)), K, kind="two_gaussians")[0]
    np.testing.assert_allclose(got, two_gaussians(K, flux, y, x, cov, phi, s), rtol=1e-10, atol=1e-13 * flux)
    assert got.sum() == pytest.approx(flux)


def test_profiles_of_any_kind_are_drawn_as_their_kind() -> None:
    """A batch of Gaussian (``nu``, ``phi`` 0), Moffat and two-Gaussian profiles: each as :func:`profile_stamps`
    of its own kind."""
    cov = np.array([[2.0, 0.3], [0.3, 1.5]])
    cases = [(None, None), (2.5, None), (None, (0.2, 2.5)), (None, None), (4.0, None), (None, (0.4, 1.5))]
    batch = np.concatenate([params_of(1.0, 0.3, -0.2, cov, beta, wing) for beta, wing in cases])
    np.testing.assert_array_equal(profiles.kinds(batch), [0, 1, 2, 0, 1, 2])
    got = draw(batch, K)
    for i, (beta, wing) in enumerate(cases):
        np.testing.assert_array_equal(got[i], profile_stamps(batch[i:i + 1], K, kind=kind_of(beta, wing))[0])


def test_a_steep_moffat_profile_is_the_gaussian() -> None:
    cov = np.array([[2.0, 0.3], [0.3, 1.5]])
    p = params_of(1.0, 0.3, -0.2, cov, None)
    gauss = profile_stamps(p, K, kind="gaussian")
    p[0, 6] = 1e-4
    np.testing.assert_allclose(profile_stamps(p, K, kind="moffat"), gauss, atol=1e-4 * gauss.max())


@settings(max_examples=40, deadline=None)
@given(flux=st.floats(0.5, 2.0), y=st.floats(-1.0, 1.0), x=st.floats(-1.0, 1.0), cov=covariances,
       beta=st.one_of(st.none(), st.floats(2.0, 10.0)),
       wing=st.one_of(st.none(), st.tuples(st.floats(0.05, 0.8), st.floats(1.3, 4.0))))
def test_jacobian_is_the_finite_difference(flux, y, x, cov, beta, wing) -> None:
    kind = kind_of(beta, wing)
    p = params_of(flux, y, x, cov, None if wing else beta, wing)
    gains = np.random.default_rng(0).uniform(0.5, 1.0, (1, K, K))
    jac = profiles._jacobian(p, gains, kind)[1]
    free = profiles._FREE[kind]
    assert jac.shape[1] == free.size
    for j, column in enumerate(free):
        step = 1e-6 * max(1.0, abs(p[0, column]))
        up, down = p.copy(), p.copy()
        up[0, column] += step
        down[0, column] -= step
        numeric = (profiles._jacobian(up, gains, kind)[0] - profiles._jacobian(down, gains, kind)[0]) / (2 * step)
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


@pytest.mark.parametrize(("beta", "wing"), [(None, None), (3.0, None), (None, (0.25, 2.5))])
def test_fit_recovers_the_profile_of_an_exact_quadratic(beta, wing) -> None:
    """``b = M H_true``: the minimiser is ``H_true``; from a start off by 20-30 % the fit finds its parameters."""
    truths = [(1.3, 0.4, -0.3, np.array([[2.0, 0.3], [0.3, 1.4]])),
              (0.8, -0.6, 0.2, np.array([[1.2, -0.2], [-0.2, 2.2]]))]
    gains = np.random.default_rng(1).uniform(0.7, 1.0, (2, K, K))
    normal, _ = blur_normal(np.array([1.0, 1.7]))
    kind = kind_of(beta, wing)
    true_p = np.concatenate([params_of(f, y, x, c, beta, wing) for f, y, x, c in truths])
    h_true = profile_stamps(true_p, K, kind=kind) * gains
    rhs = normal(h_true[:, None], np.arange(2))[:, 0]
    start = np.concatenate([params_of(f * 1.2, y + 0.3, x - 0.2, c * 1.3, None) for f, y, x, c in truths])
    if beta is not None:
        start[:, 6] = 0.05
    if wing is not None:
        start[:, 7:] = (0.15, 2.0)
    got, stamps, value = fit_profiles(normal, rhs, gains, start, kind=kind, iterations=40)
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
    got, _, value = fit_profiles(normal, rhs, gains, start, kind="gaussian", iterations=30)

    def form(theta: np.ndarray) -> float:
        p = start.copy()
        p[0, :6] = theta
        hh = profile_stamps(p, K, kind="gaussian")[0].ravel()
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
    rhs = normal(profile_stamps(p, K, kind="gaussian")[:, None], np.arange(2))[:, 0]
    start = p.copy()
    start[1, :3] = (1.0, 0.0, 0.0)
    got, _, _ = fit_profiles(normal, rhs, gains, start, kind="gaussian", iterations=20)
    np.testing.assert_allclose(got[0], p[0], atol=1e-10)
    np.testing.assert_allclose(got[1], p[1], rtol=1e-5, atol=1e-6)

    def alone(rows: np.ndarray):
        return lambda x, sub: normal(x, rows[sub])

    for i in range(2):
        one = fit_profiles(alone(np.array([i])), rhs[i:i + 1], gains[i:i + 1], start[i:i + 1], kind="gaussian",
                           iterations=20)[0]
        np.testing.assert_allclose(got[i], one[0], rtol=1e-12, atol=1e-14)


def test_extension_gains_predict_what_the_fits_find() -> None:
    """From the Gaussian fit: where the data are a Gaussian, nothing to gain from either extension; where they
    are a Moffat profile (beta 4 and 2.5) or a core and a wing (a fifth and a third of the light, twice and 2.5
    times as wide), the gain predicted for that kind is within a factor 3 of what its fit then finds, the fit
    finds its parameters, and the other kind is predicted to gain less."""
    cases = [(None, None), (4.0, None), (2.5, None), (None, (0.2, 2.0)), (None, (0.33, 2.5))]
    normal, _ = blur_normal(np.full(len(cases), 1.2))
    cov = np.array([[1.8, 0.2], [0.2, 1.3]])
    truths = [params_of(1.0, 0.2, -0.1, cov, beta, wing) for beta, wing in cases]
    gains = np.ones((len(cases), K, K))
    data = np.concatenate([draw(p, K) for p in truths])
    rhs = normal(data[:, None], np.arange(len(cases)))[:, 0]
    start = np.concatenate([params_of(1.0, 0.0, 0.0, cov, None)] * len(cases))
    gauss, _, g_value = fit_profiles(normal, rhs, gains, start, kind="gaussian", iterations=30)
    predicted = profiles.extension_gains(normal, rhs, gains, gauss)
    assert predicted.shape == (len(cases), 2)
    assert np.all(predicted[0] <= 1e-9 * abs(g_value[0]))
    at = gauss.copy()
    at[:, 6] = 0.05
    moffat_, _, m_value = fit_profiles(normal, rhs, gains, at, kind="moffat", iterations=60)
    at = gauss.copy()
    at[:, 7:] = (0.15, 2.0)
    wing, _, w_value = fit_profiles(normal, rhs, gains, at, kind="two_gaussians", iterations=60)
    for rows, column, found in ((slice(1, 3), 0, g_value - m_value), (slice(3, 5), 1, g_value - w_value)):
        assert np.all((predicted[rows, column] > found[rows] / 3) & (predicted[rows, column] < 3 * found[rows]))
        assert np.all(predicted[rows, 1 - column] < predicted[rows, column])
    assert (g_value - m_value)[0] <= 1e-9 * abs(g_value[0]) and (g_value - w_value)[0] <= 1e-9 * abs(g_value[0])
    np.testing.assert_allclose(moffat_[1:3, 6], [0.25, 0.4], rtol=1e-3)
    np.testing.assert_allclose(wing[3:, 7:], [(0.2, 2.0), (0.33, 2.5)], rtol=1e-3)
    np.testing.assert_allclose(wing[3:, :6], np.concatenate(truths[3:])[:, :6], rtol=1e-3, atol=1e-4)


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
    rhs = normal(profile_stamps(p, K, kind="gaussian")[:, None], np.arange(2))[:, 0]
    rhs[0] = 0.0
    start = p.copy()
    start[:, :3] = (0.9, 0.1, 0.1)
    got, _, _ = fit_profiles(some_blind, rhs, gains, start, kind="gaussian", iterations=20)
    np.testing.assert_allclose(got[1], p[1], rtol=1e-5, atol=1e-6)
    assert profiles._valid(got, K, "gaussian").all()
