"""The smooth kernel-field model: exact recovery, cross-validation, noise, outliers, invariances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.field import FLOOR_BIN_TILES, _expected_squares, fit_kernel_field, polynomial_terms
from pipeline.sim.scenes import gaussian_kernel

K = 9


def grid(n: int = 6, step: float = 256.0, first: float = 127.5) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.meshgrid(first + step * np.arange(n), first + step * np.arange(n), indexing="ij")
    return y.ravel(), x.ravel()


def polynomial_field(y, x, degree: int, seed: int = 0) -> np.ndarray:
    """Kernels whose every pixel is a random polynomial of total degree ``degree`` in (y, x)."""
    rng = np.random.default_rng(seed)
    yn, xn = (y - 700.0) / 900.0, (x - 500.0) / 800.0
    out = np.zeros((len(y), K, K))
    for i, j in polynomial_terms(degree):
        out += (xn**i * yn**j)[:, None, None] * rng.normal(size=(K, K))
    return out


def smooth_gaussian_field(y, x) -> np.ndarray:
    """A realistic field: width and shape drift smoothly (not exactly polynomial)."""
    return np.stack([gaussian_kernel(K, fwhm=2.4 + 0.6 * xx / 1536 + 0.3 * (yy / 1536) ** 2,
                                     e1=0.05 * yy / 1536, e2=0.04 * xx / 1536) for yy, xx in zip(y, x)])


def test_terms_by_total_degree():
    assert polynomial_terms(0) == [(0, 0)]
    assert polynomial_terms(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    assert len(polynomial_terms(3)) == 10


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_recovers_a_polynomial_field_exactly_and_finds_its_degree(degree):
    y, x = grid(7)
    truth = polynomial_field(y, x, degree)
    field = fit_kernel_field(y, x, truth, max_degree=4)
    assert field.degree >= degree  # any higher degree also reproduces it exactly
    assert field.cv_error < 1e-9
    assert not field.rejected.any() and field.used.all()
    yq, xq = np.array([10.0, 900.3, 1600.0]), np.array([1500.0, 33.0, 800.5])
    np.testing.assert_allclose(field.kernel_at(yq, xq), polynomial_field(yq, xq, degree), atol=1e-9)
    if degree < 4:
        lower = fit_kernel_field(y, x, truth, degree=max(degree - 1, 0))
        assert degree == 0 or lower.cv_error > 1e-3


def test_leave_one_out_error_equals_refitting_without_each_tile():
    y, x = grid(5)
    rng = np.random.default_rng(3)
    kernels = polynomial_field(y, x, 1) + 0.05 * rng.normal(size=(len(y), K, K))
    weights = rng.uniform(0.5, 2.0, len(y))
    field = fit_kernel_field(y, x, kernels, weights=weights, degree=2, clip=np.inf)
    num = den = 0.0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        other = fit_kernel_field(y[keep], x[keep], kernels[keep], weights=weights[keep], degree=2, clip=np.inf)
        err = other.kernel_at(y[i], x[i]) - kernels[i]
        num += weights[i] * np.sum(err**2)
        den += weights[i] * np.sum(kernels[i] ** 2)
    assert field.cv_error == pytest.approx(np.sqrt(num / den), rel=1e-9)


def test_the_model_halves_the_error_of_noisy_tiles():
    y, x = grid(6)
    truth = smooth_gaussian_field(y, x)
    rng = np.random.default_rng(7)
    noisy = truth + 0.004 * rng.normal(size=truth.shape)  # about 5 % relative error per tile
    field = fit_kernel_field(y, x, noisy)
    model = field.kernel_at(y, x)

    def err(k):
        return np.median(np.sqrt(np.sum((k - truth) ** 2, axis=(1, 2)) / np.sum(truth**2, axis=(1, 2))))

    assert err(model) < 0.5 * err(noisy), (err(model), err(noisy), field.degree)
    assert 1 <= field.degree <= 3


def test_a_wild_tile_is_rejected_and_does_not_spoil_the_model():
    y, x = grid(6)
    truth = smooth_gaussian_field(y, x)
    rng = np.random.default_rng(1)
    tiles = truth + 0.002 * rng.normal(size=truth.shape)
    tiles[14] = np.roll(truth[14], 3, axis=1) * 1.5  # a bad estimate
    tiles[20] = np.nan  # an unusable tile
    field = fit_kernel_field(y, x, tiles)
    assert field.rejected[14] and not field.used[14]
    assert not field.used[20] and not field.rejected[20]
    assert field.rejected.sum() <= 2
    model = field.kernel_at(y[14], x[14])
    assert np.sqrt(np.sum((model - truth[14]) ** 2) / np.sum(truth[14] ** 2)) < 0.03


def _weights(n: int, seed: int) -> np.ndarray:
    """Weights as a field's signal-to-noise ratios give them: most alike, a tenth of the tiles (bright
    stars) 4 to 10 times heavier (``tile_weights`` caps at 10 times the median)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.1, rng.uniform(4.0, 10.0, n), rng.uniform(0.8, 1.25, n))


def test_tiles_as_good_at_any_weight_are_not_rejected_for_their_weight():
    """Kernels whose error does not shrink with their weight (Welch's: a bias of the estimator, the same in
    bright and faint tiles): the heavy tiles are not outliers; judged by their weights alone, they were."""
    y, x = grid(16)
    truth = smooth_gaussian_field(y, x)
    w = _weights(len(y), seed=3)
    tiles = truth + 0.003 * np.random.default_rng(4).normal(size=truth.shape)
    tiles[40] = np.roll(truth[40], 2, axis=1)  # and one bad estimate
    field = fit_kernel_field(y, x, tiles, weights=w)
    assert field.rejected[40]
    assert field.rejected.sum() <= 3, np.sort(w[field.rejected])


def test_a_heavy_tile_far_beyond_its_own_noise_is_rejected():
    """Kernels whose error shrinks as the weights say (noise): a heavy tile twice its own expected error
    off is rejected, though its error is smaller than a light tile's usual one."""
    y, x = grid(16)
    truth = smooth_gaussian_field(y, x)
    w = _weights(len(y), seed=5)
    noise = np.random.default_rng(6).normal(size=truth.shape) * (0.004 / np.sqrt(w))[:, None, None]
    heavy = int(np.argmax(w))
    bump = np.zeros((K, K))
    bump[K // 2, K // 2 + 1] = 1.0
    noise[heavy] += 2.0 * 0.004 / np.sqrt(w[heavy]) * np.sqrt(K * K) * bump
    field = fit_kernel_field(y, x, truth + noise, weights=w)
    assert np.linalg.norm(noise[heavy]) < np.median(np.linalg.norm((noise[w < 1.5]).reshape(-1, K * K), axis=1))
    assert field.rejected[heavy]
    assert field.rejected.sum() <= 3


@settings(max_examples=40)
@given(a=st.one_of(st.just(0.0), st.floats(1e-6, 10.0)), b=st.one_of(st.just(0.0), st.floats(1e-6, 10.0)),
       seed=st.integers(0, 2**16), n=st.integers(2 * FLOOR_BIN_TILES, 300))
def test_expected_squares_of_exact_errors_are_those_errors(a, b, seed, n):
    """Squared residuals exactly ``a / w + b`` are expected as they are (the medians of a monotonic
    function are its values at the medians); one weight for all: expected in proportion, whatever ``b``."""
    if a + b == 0.0:
        b = 1.0
    w = _weights(n, seed)
    squares = a / w + b
    np.testing.assert_allclose(_expected_squares(squares, w), squares, rtol=1e-9)
    same = np.full(n, 2.0)
    expected = _expected_squares(squares, same)
    np.testing.assert_allclose(expected / expected[0], 1.0)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 300), scale=st.floats(1e-3, 1e3), size=st.floats(1e-3, 1e3))
def test_expected_squares_follow_the_units_of_the_residuals_not_of_the_weights(seed, n, scale, size):
    """Weights in other units change nothing; residuals ``size`` times larger are expected ``size**2`` times
    larger (whatever they are: noise, a floor, outliers)."""
    rng = np.random.default_rng(seed)
    w = _weights(n, seed)
    squares = rng.exponential(size=n) * (rng.random() / w + rng.random())
    expected = _expected_squares(squares, w)
    np.testing.assert_allclose(_expected_squares(squares, scale * w), expected, rtol=1e-9)
    np.testing.assert_allclose(_expected_squares(size**2 * squares, w), size**2 * expected, rtol=1e-9)


def test_too_few_tiles_is_an_error():
    y, x = grid(2)
    kernels = polynomial_field(y, x, 1)
    kernels[3] = np.nan  # 3 usable tiles; on a 2x2 grid degree 2 keeps the 4 terms it supports
    with pytest.raises(ValueError, match="degree 2 has 4 terms but only 3 usable tiles"):
        fit_kernel_field(y, x, kernels, degree=2)
    with pytest.raises(ValueError, match="no usable tile"):
        fit_kernel_field(y, x, np.full((4, K, K), np.nan))


@pytest.mark.parametrize("degree", [None, 2, 3])
def test_a_single_row_or_two_rows_of_tiles(degree):
    """Terms a grid cannot constrain are left out: no variation along y on one row, no blow-up on two."""
    y1, x1 = np.full(8, 127.5), 127.5 + 256.0 * np.arange(8)
    truth = polynomial_field(y1, x1, 1)  # linear in x (and y, but y is constant here)
    field = fit_kernel_field(y1, x1, truth, degree=degree)
    np.testing.assert_allclose(field.kernel_at(y1, x1), truth, atol=1e-9)
    np.testing.assert_allclose(field.kernel_at(y1 + 300.0, x1), truth, atol=1e-9)  # flat along y
    y2, x2 = np.concatenate([y1, y1 + 256.0]), np.concatenate([x1, x1])
    truth2 = polynomial_field(y2, x2, 1)
    field2 = fit_kernel_field(y2, x2, truth2, degree=degree)
    between = field2.kernel_at(y1 + 128.0, x1)
    np.testing.assert_allclose(between, polynomial_field(y1 + 128.0, x1, 1), atol=1e-8)
    assert np.abs(field2.coefficients).max() < 1e3


@settings(max_examples=25)
@given(shift_y=st.floats(-1e4, 1e4), shift_x=st.floats(-1e4, 1e4), scale=st.floats(0.1, 10.0),
       seed=st.integers(0, 2**16))
def test_predictions_do_not_depend_on_the_coordinate_origin_or_unit(shift_y, shift_x, scale, seed):
    y, x = grid(5)
    rng = np.random.default_rng(seed)
    kernels = polynomial_field(y, x, 2, seed) + 0.02 * rng.normal(size=(len(y), K, K))
    a = fit_kernel_field(y, x, kernels, degree=2)
    b = fit_kernel_field(shift_y + scale * y, shift_x + scale * x, kernels, degree=2)
    yq, xq = np.array([5.0, 700.0]), np.array([1200.0, 64.0])
    np.testing.assert_allclose(b.kernel_at(shift_y + scale * yq, shift_x + scale * xq), a.kernel_at(yq, xq),
                               rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(a.used, b.used)
