"""The joint fit of a kernel field to the tiles' normal equations."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from pipeline.core.field import field_frame, legendre_design
from pipeline.core.gram import design_rows
from pipeline.core.joint import (
    PackedGrams,
    TileStatistics,
    _core_mask,
    _held_out_iterations,
    _HeldOut,
    _leave_one_out,
    _penalty_matrix,
    _penalty_units,
    _Pooled,
    _TilePenalty,
    fit_joint_field,
    pack_gram,
    spread_rows,
    variation_basis,
)
from pipeline.core.lstsq import lstsq_kernels
from pipeline.errors import OptionError


def _random_statistics(n_tiles, k, rng, lam=(0.5, 2.0), grid=None):
    k2 = k * k
    rows = rng.normal(size=(n_tiles, 3 * k2, k2))
    gc = np.einsum("tpi,tpj->tij", rows, rows)
    cc = np.einsum("tpi,tp->ti", rows, rng.normal(size=(n_tiles, 3 * k2)))
    yy = 10.0 * np.einsum("tii->t", gc)
    if grid is None:
        y, x = rng.uniform(0, 1000, n_tiles), rng.uniform(0, 1000, n_tiles)
    else:
        y, x = grid
    lam_t = np.tile(np.asarray(lam, dtype=float), (n_tiles, 1))
    return TileStatistics(gc, cc, yy, np.full(n_tiles, 3 * k2), y, x, lam_t)


def _grid_statistics(side, k, rng):
    """Random statistics of ``side`` x ``side`` tiles of 256 px."""
    yy, xx = np.mgrid[0:side, 0:side] * 256.0 + 128
    return _random_statistics(side * side, k, rng, grid=(yy.ravel(), xx.ravel()))


def _normalised(stats):
    """``(u, v)`` of the tiles in the frame of the usable ones."""
    return field_frame(stats.y, stats.x, stats.usable()).normalised(stats.y, stats.x)


def _tiles_penalty(k, lam):
    """The compact penalty of each tile at its row of strengths ``lam`` (``(T, 2)``)."""
    return _TilePenalty(_penalty_units(k, "compact", (0.0, 0.0)), np.asarray(lam, dtype=float))


def test_as_many_terms_as_tiles_gives_the_independent_tile_fits():
    """The pooled penalty is the sum of the tiles' own: with P = T the fit is the tile fits."""
    rng = np.random.default_rng(1)
    k = 5
    stats = _random_statistics(3, k, rng, grid=(np.array([0.0, 0.0, 500.0]), np.array([0.0, 500.0, 0.0])))
    joint = fit_joint_field(stats, degrees=[1], strengths=[1.0], criterion="pixels")
    q = _penalty_matrix(k, "compact", np.array([0.5, 2.0]), (0.0, 0.0))
    model = joint.field.kernel_at(stats.y, stats.x).reshape(3, -1)
    for t in range(3):
        own = np.linalg.solve(stats.gc[t] + np.trace(stats.gc[t]) * q, stats.cc[t])
        np.testing.assert_allclose(model[t], own, rtol=1e-9, atol=1e-12 * np.abs(own).max())


@pytest.mark.parametrize("iterations", [0, 200])
@pytest.mark.parametrize("core_radius, weighted, basis", [(None, False, False), (1.0, False, False),
                                                         (None, True, False), (None, True, True)])
def test_leave_one_out_equals_a_refit_without_the_tile(core_radius, weighted, basis, iterations):
    """Also with the variation terms restricted to the kernel's core (the other coefficients held at zero),
    with each tile's equations weighted, and with the variation terms in a basis of kernels; by direct
    solves alone (no iteration) and by the iteration alone (conjugate gradients: exact within ``k*k``
    steps, but for rounding)."""
    rng = np.random.default_rng(2)
    k = 3
    stats = _grid_statistics(3, k, rng)
    used = stats.usable()
    u, v = _normalised(stats)
    phi = legendre_design(u, v, 2)
    lam = rng.uniform(0.2, 2.0, size=(9, 2))  # each tile its own strengths
    keep = _core_mask(k, phi.shape[1], core_radius)
    scale = rng.uniform(0.1, 3.0, 9) if weighted else None
    kernels = np.linalg.qr(rng.normal(size=(k * k, 3)))[0] if basis else None
    pooled = _Pooled(stats, used, phi, keep, scale, basis=kernels)
    coef, factor = pooled.solve(_tiles_penalty(k, lam))
    if basis:  # every variation term in the span of the basis
        np.testing.assert_allclose(coef[1:] - coef[1:] @ kernels @ kernels.T, 0, atol=1e-12 * np.abs(coef).max())
    if core_radius is not None:  # corners of the 3x3 stamp are outside radius 1: held at zero
        assert np.all(coef[1:].reshape(-1, k, k)[:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0)
    held = _HeldOut(stats, used, pooled, _tiles_penalty(k, lam))
    if iterations:
        _, settled = _held_out_iterations(pooled, factor, coef, held, 1.0, iterations, 1e-12)
        assert settled.all()
    fast = _leave_one_out(pooled, factor, coef, held, iterations=iterations)
    for t in range(9):
        keep_t = np.arange(9) != t
        sub = TileStatistics(stats.gc[keep_t], stats.cc[keep_t], stats.yy[keep_t], stats.count[keep_t],
                             stats.y[keep_t], stats.x[keep_t], stats.lam[keep_t])
        coef_t, _ = _Pooled(sub, np.ones(8, bool), phi[keep_t], keep, None if scale is None else scale[keep_t],
                            basis=kernels).solve(_tiles_penalty(k, lam[keep_t]))
        predicted = phi[t] @ coef_t
        np.testing.assert_allclose(fast[t], predicted, rtol=0, atol=1e-9 * np.abs(predicted).max())


def test_variation_basis_spans_the_mean_and_leading_components_orthonormally():
    rng = np.random.default_rng(17)
    mean, direction = rng.normal(size=25), rng.normal(size=25)
    kernels = mean + rng.normal(size=(40, 1)) * direction + 1e-6 * rng.normal(size=(40, 25))
    kernels[3] = np.nan  # a tile without a kernel is left out
    basis = variation_basis(kernels, 2)
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-12)
    for vector in (mean, direction):  # both in its span, to the noise
        assert np.linalg.norm(vector - basis @ (basis.T @ vector)) < 1e-4 * np.linalg.norm(vector)
    with pytest.raises(OptionError, match="variation=0"):
        variation_basis(kernels, 0)


@pytest.mark.parametrize("side, degree, basis", [(4, 1, False), (8, 2, False), (8, 2, True)])
def test_the_iteration_settles_every_tile_of_a_larger_grid_as_the_direct_solves_predict_it(side, degree, basis):
    rng = np.random.default_rng(side)
    k = 3
    stats = _grid_statistics(side, k, rng)
    used = stats.usable()
    u, v = _normalised(stats)
    lam = rng.uniform(0.2, 2.0, size=(side * side, 2))
    kernels = np.linalg.qr(rng.normal(size=(k * k, 4)))[0] if basis else None
    pooled = _Pooled(stats, used, legendre_design(u, v, degree), scale=rng.uniform(0.5, 2.0, side * side),
                     basis=kernels)
    coef, factor = pooled.solve(_tiles_penalty(k, 0.3 * lam))
    held = _HeldOut(stats, used, pooled, _tiles_penalty(k, lam))
    iterated, settled = _held_out_iterations(pooled, factor, coef, held, 0.3, 200, 1e-12)
    assert settled.all()
    direct = _leave_one_out(pooled, factor, coef, held, strength=0.3, iterations=0)
    np.testing.assert_allclose(iterated, direct, rtol=0, atol=1e-10 * np.abs(direct).max())
    if side == 4:  # 10 steps settle some tiles, the others are solved directly
        coef, factor = pooled.solve(_tiles_penalty(k, 0.3 * lam))
        _, some = _held_out_iterations(pooled, factor, coef, held, 0.3, 10, 1e-12)
        assert 0 < some.sum() < len(some)
        mixed = _leave_one_out(pooled, factor, coef, held, strength=0.3, iterations=10, tolerance=1e-12)
        np.testing.assert_allclose(mixed, direct, rtol=0, atol=1e-10 * np.abs(direct).max())
    coef, factor = pooled.solve(_tiles_penalty(k, 0.3 * lam))  # the direct solves used the factor up
    # in single precision (a fit's scores): the products in it, settled to 1e-6 of each tile's largest pixel
    single = _HeldOut(stats, used, pooled, _tiles_penalty(k, lam), dtype=np.float32)
    np.testing.assert_allclose(_leave_one_out(pooled, factor, coef, single, strength=0.3), direct, rtol=0,
                               atol=1e-5 * np.abs(direct).max())


def test_a_lower_degree_at_another_strength_from_the_top_degree_system_equals_its_own_fit():
    """The search assembles the highest degree's system once: a lower degree's is its leading block, and the
    held-out predictions at ``f`` times the tiles' penalties equal refits without each tile."""
    rng = np.random.default_rng(15)
    k = 3
    stats = _grid_statistics(3, k, rng)
    used = stats.usable()
    u, v = _normalised(stats)
    lam = rng.uniform(0.2, 2.0, size=(9, 2))
    scale = rng.uniform(0.5, 2.0, 9)
    top = _Pooled(stats, used, legendre_design(u, v, 2), _core_mask(k, 6, 1.0), scale)
    f = 0.3
    coef, factor = top.solve(_tiles_penalty(k, f * lam), n_terms=3)
    low = legendre_design(u, v, 1)
    own, _ = _Pooled(stats, used, low, _core_mask(k, 3, 1.0), scale).solve(_tiles_penalty(k, f * lam))
    np.testing.assert_allclose(coef, own, rtol=1e-10, atol=1e-13 * np.abs(own).max())
    held = _HeldOut(stats, used, top, _tiles_penalty(k, lam))  # the penalties at f = 1
    fast = _leave_one_out(top, factor, coef, held, strength=f)
    for t in range(9):
        keep_t = np.arange(9) != t
        sub = TileStatistics(stats.gc[keep_t], stats.cc[keep_t], stats.yy[keep_t], stats.count[keep_t],
                             stats.y[keep_t], stats.x[keep_t], stats.lam[keep_t])
        coef_t, _ = _Pooled(sub, np.ones(8, bool), low[keep_t], _core_mask(k, 3, 1.0), scale[keep_t]).solve(
            _tiles_penalty(k, f * lam[keep_t]))
        np.testing.assert_allclose(fast[t], low[t] @ coef_t, rtol=0, atol=1e-9 * np.abs(coef_t).max())


def test_weighted_pooled_fit_equals_the_dense_weighted_normal_equations():
    """``sum_t w_t (phi_t phi_t^T) kron (Gc_t + s_t Q_t)``, ``sum_t w_t phi_t kron cc_t``, assembled densely."""
    rng = np.random.default_rng(13)
    k = 3
    stats = _random_statistics(6, k, rng)
    u, v = _normalised(stats)
    phi = legendre_design(u, v, 1)
    lam = rng.uniform(0.2, 2.0, size=(6, 2))
    scale = rng.uniform(0.1, 3.0, 6)
    coef, _ = _Pooled(stats, np.ones(6, bool), phi, None, scale).solve(_tiles_penalty(k, lam))
    a = sum(w * np.kron(np.outer(p, p), g + np.trace(g) * _penalty_matrix(k, "compact", s, (0.0, 0.0)))
            for w, p, g, s in zip(scale, phi, stats.gc, lam))
    r = sum(w * np.kron(p, c) for w, p, c in zip(scale, phi, stats.cc))
    np.testing.assert_allclose(coef.ravel(), np.linalg.solve(a, r), rtol=1e-9)
    # the variation term as combinations of a basis of kernels: the same equations projected on it
    basis = np.linalg.qr(rng.normal(size=(k * k, 4)))[0]
    coef, _ = _Pooled(stats, np.ones(6, bool), phi, None, scale, basis=basis).solve(_tiles_penalty(k, lam))
    expand = np.zeros((3 * k * k, k * k + 8))
    expand[: k * k, : k * k] = np.eye(k * k)
    expand[k * k : 2 * k * k, k * k : k * k + 4] = basis
    expand[2 * k * k :, k * k + 4 :] = basis
    theta = np.linalg.solve(expand.T @ a @ expand, expand.T @ r)
    np.testing.assert_allclose(coef.ravel(), expand @ theta, rtol=1e-9, atol=1e-12 * np.abs(coef).max())


def test_resolved_score_equals_the_refits_seen_through_each_tiles_own_fit():
    """``sum_t w_t |B_t^-1 (Gc_t K_-t - cc_t)|^2``: each held-out prediction as the tile's own regularised
    estimator would see it, against that estimator's result, by brute-force refits without the tile."""
    rng = np.random.default_rng(12)
    k = 3
    base = _grid_statistics(3, k, rng)
    lam = base.lam * rng.uniform(0.5, 2.0, size=base.lam.shape)  # each tile its own strengths
    weights = rng.uniform(0.2, 1.0, 9)
    stats = TileStatistics(base.gc, base.cc, base.yy, base.count, base.y, base.x, lam, weights=weights)
    joint = fit_joint_field(stats, degrees=[1], strengths=[0.3], criterion="resolved", scored=None,
                            weighting="equal")
    u, v = _normalised(stats)
    phi = legendre_design(u, v, 1)
    total = 0.0
    for t in range(9):
        keep_t = np.arange(9) != t
        sub = TileStatistics(stats.gc[keep_t], stats.cc[keep_t], stats.yy[keep_t], stats.count[keep_t],
                             stats.y[keep_t], stats.x[keep_t], stats.lam[keep_t])
        coef_t, _ = _Pooled(sub, np.ones(8, bool), phi[keep_t]).solve(_tiles_penalty(k, 0.3 * lam[keep_t]))
        own = stats.gc[t] + np.trace(stats.gc[t]) * _penalty_matrix(k, "compact", lam[t], (0.0, 0.0))
        seen = np.linalg.solve(own, stats.gc[t] @ (phi[t] @ coef_t) - stats.cc[t])
        total += weights[t] * np.sum(seen**2)
    assert joint.criterion == "resolved"
    np.testing.assert_allclose(joint.scores[(1, 0.3)], total, rtol=1e-4)  # the search predicts in float32


def _field_pair(size, kernel_at, y0, x0, rng):
    source = rng.normal(size=(size, size)) + 5.0
    kernel = kernel_at(y0, x0)
    return source, fftconvolve(source, kernel, mode="same") + 3.0


def _linear_field_terms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A unit-sum 7x7 Gaussian and two small terms varying it along x and along y."""
    yy, xx = np.mgrid[-3:4, -3:4]
    base = np.exp(-(yy**2 + xx**2) / (2 * 1.2**2))
    base /= base.sum()
    return (base, 0.02 * np.exp(-((yy - 1) ** 2 + xx**2) / 2.0),
            0.02 * np.exp(-(yy**2 + (xx + 1) ** 2) / 2.0))


def _grid_tiles(kernel_at, side: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sources, targets, centres)`` of ``side`` x ``side`` 40-px tiles, centres 20, 60, ... apart by 40."""
    centres = np.array([(y, x) for y in range(side) for x in range(side)], dtype=float) * 40.0 + 20.0
    pairs = [_field_pair(40, kernel_at, y, x, rng) for y, x in centres]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), centres


def test_noise_free_polynomial_field_is_recovered_exactly():
    """Tiles blurred by a degree-1 field (evaluated at their centres): the joint fit returns its terms."""
    rng = np.random.default_rng(3)
    k = 7
    base, slope_x, slope_y = _linear_field_terms()

    def kernel_at(y, x):  # u, v in [-1, 1] over the tile centres
        return base + (x - 60.0) / 40.0 * slope_x + (y - 60.0) / 40.0 * slope_y

    sources, targets, centres = _grid_tiles(kernel_at, 3, rng)
    result = lstsq_kernels(sources, targets, kernel_size=k, robust=False, statistics=True)
    stats = TileStatistics.from_lstsq(result, centres[:, 0], centres[:, 1])
    joint = fit_joint_field(stats, degrees=[1], strengths=[1.0])
    assert joint.field.degree == 1
    coef = joint.field.coefficients  # terms 1, P1(u) = u, P1(v) = v
    np.testing.assert_allclose(coef[0], base, atol=1e-6)
    np.testing.assert_allclose(coef[1], slope_x, atol=1e-6)
    np.testing.assert_allclose(coef[2], slope_y, atol=1e-6)


def test_statistics_give_the_tile_residual_and_kernel():
    """RSS from the statistics is the pixel residual (best background); the per-tile solve is the kernel."""
    rng = np.random.default_rng(4)
    k, size = 5, 32
    src = rng.normal(size=(1, size, size)) + 2.0
    kernel = np.exp(-((np.mgrid[-2:3, -2:3] ** 2).sum(axis=0)) / 2.0)
    kernel /= kernel.sum()
    tgt = fftconvolve(src[0], kernel, mode="same")[None] + 0.05 * rng.normal(size=(1, size, size))
    result = lstsq_kernels(src, tgt, kernel_size=k, robust=False, recentre=False, statistics=True)
    stats = TileStatistics.from_lstsq(result, [16.0], [16.0])
    probe = rng.normal(size=(1, k * k))
    h = k // 2
    yy, xx = np.mgrid[h : size - h, h : size - h]
    rows = design_rows(src[0], h, (yy.ravel(), xx.ravel()))
    resid = tgt[0][h : size - h, h : size - h].ravel() - rows @ probe[0]
    resid -= resid.mean()
    assert stats.rss(probe)[0] == pytest.approx(resid @ resid, rel=1e-9)
    q = _penalty_matrix(k, "compact", result.lam_terms[0], (0.0, 0.0))
    own = np.linalg.solve(stats.gc[0] + np.trace(stats.gc[0]) * q, stats.cc[0])
    np.testing.assert_allclose(own, result.kernels[0].ravel(), rtol=0, atol=1e-7 * np.abs(own).max())


def test_statistics_of_a_tile_without_a_kernel_are_nan():
    rng = np.random.default_rng(16)
    src = rng.normal(size=(3, 32, 32)) + 2.0
    tgt = src + 0.01 * rng.normal(size=src.shape)
    tgt[1] = np.nan  # no valid pixel: no kernel, no statistics
    result = lstsq_kernels(src, tgt, kernel_size=5, statistics=True)
    gc, cc, yy = result.statistics
    assert np.isnan(gc[1]).all() and np.isnan(cc[1]).all() and np.isnan(yy[1])
    assert np.isfinite(gc[[0, 2]]).all() and np.isfinite(cc[[0, 2]]).all() and np.isfinite(yy[[0, 2]]).all()
    assert TileStatistics.from_lstsq(result, np.zeros(3), np.arange(3.0)).usable().tolist() == [True, False, True]


def test_no_usable_tile_is_an_error():
    rng = np.random.default_rng(5)
    stats = _random_statistics(2, 3, rng)
    bad = TileStatistics(stats.gc, stats.cc, stats.yy, np.zeros(2, int), stats.y, stats.x, stats.lam)
    with pytest.raises(ValueError, match="no usable tile"):
        fit_joint_field(bad)
    with pytest.raises(OptionError, match="needs the tiles' own kernels"):
        fit_joint_field(stats)
    with pytest.raises(OptionError, match="criterion='tiles': use one of 'kernels', 'resolved', 'pixels'"):
        fit_joint_field(stats, criterion="tiles")


def _noisy_tiles(kernel_at, n_side, rng, k=7, size=48, noise=0.5):
    centres = np.array([(y, x) for y in range(n_side) for x in range(n_side)], dtype=float) * size + size / 2
    sources, targets, truth = [], [], []
    for y, x in centres:
        kernel = kernel_at(y, x)
        src = np.zeros((size, size))
        ys, xs = rng.integers(0, size, 40), rng.integers(0, size, 40)
        np.add.at(src, (ys, xs), rng.pareto(1.5, 40) * 50 + 20)
        src = fftconvolve(src, np.exp(-(np.mgrid[-3:4, -3:4] ** 2).sum(axis=0) / 2.0), mode="same")
        sources.append(src + noise * rng.normal(size=src.shape))
        targets.append(fftconvolve(src, kernel, mode="same") + 2.0 + noise * rng.normal(size=src.shape))
        truth.append(kernel)
    return np.stack(sources), np.stack(targets), np.stack(truth), centres


def _rel(est, truth):
    return np.sqrt(((est - truth) ** 2).sum(axis=(-2, -1)) / (truth**2).sum(axis=(-2, -1)))


def test_constant_field_low_degree_and_better_than_tiles():
    """Tiles sharing one kernel: the cross-validated joint fit keeps a low degree and beats the tiles."""
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[-3:4, -3:4]
    kernel = np.exp(-(yy**2 + 0.8 * xx**2) / (2 * 1.1**2))
    kernel /= kernel.sum()
    src, tgt, truth, centres = _noisy_tiles(lambda y, x: kernel, 4, rng)
    result = lstsq_kernels(src, tgt, kernel_size=7, statistics=True)
    joint = fit_joint_field(TileStatistics.from_lstsq(result, centres[:, 0], centres[:, 1]))
    assert joint.field.degree <= 1
    model = joint.field.kernel_at(centres[:, 0], centres[:, 1])
    assert np.median(_rel(model, truth)) < 0.7 * np.median(_rel(result.kernels, truth))
    assert joint.criterion == "kernels"
    assert joint.scores[(joint.field.degree, joint.strength)] == min(joint.scores.values())


@given(n=st.integers(1, 500), most=st.one_of(st.none(), st.integers(1, 600)))
def test_spread_rows_are_distinct_in_range_and_reach_both_ends(n, most):
    rows = spread_rows(n, most)
    expected = n if most is None else min(n, most)
    assert len(rows) == expected
    assert np.all(np.diff(rows) > 0) and rows[0] == 0 and 0 <= rows[-1] <= n - 1
    if expected >= 2:
        assert rows[-1] == n - 1


def test_scoring_a_subset_predicts_those_tiles_as_scoring_all_does():
    rng = np.random.default_rng(7)
    k = 3
    stats = _grid_statistics(4, k, rng)
    used = stats.usable()
    u, v = _normalised(stats)
    phi = legendre_design(u, v, 1)
    penalty = _tiles_penalty(k, np.tile([0.3, 1.0], (16, 1)))
    pooled = _Pooled(stats, used, phi)
    coef, factor = pooled.solve(penalty)
    every = _leave_one_out(pooled, factor, coef, _HeldOut(stats, used, pooled, penalty))
    coef, factor = pooled.solve(penalty)  # the inverse is taken in the factor's memory: factor again
    rows = spread_rows(16, 5)
    some = _leave_one_out(pooled, factor, coef, _HeldOut(stats, used, pooled, penalty, rows))
    np.testing.assert_allclose(some, every[rows], rtol=1e-10, atol=1e-12 * np.abs(every).max())
    coef, factor = pooled.solve(penalty)
    single = _leave_one_out(pooled, factor, coef, _HeldOut(stats, used, pooled, penalty, dtype=np.float32))
    np.testing.assert_allclose(single, every, rtol=0, atol=1e-4 * np.abs(every).max())
    full = fit_joint_field(stats, degrees=[1], strengths=[1.0], criterion="pixels", scored=None)
    also = fit_joint_field(stats, degrees=[1], strengths=[1.0], criterion="pixels", scored=16)
    np.testing.assert_array_equal(full.field.coefficients, also.field.coefficients)
    assert full.scores == also.scores


def test_a_tile_far_from_the_field_is_rejected_and_the_field_refitted():
    """One tile blurred by a shifted kernel in a degree-1 field: rejected, and the field right again."""
    rng = np.random.default_rng(8)
    k = 7
    base, slope, _ = _linear_field_terms()

    def kernel_at(y, x):
        return base + (x - 80.0) / 60.0 * slope

    sources, targets, centres = _grid_tiles(kernel_at, 4, rng)
    bad = 5
    targets[bad] = fftconvolve(sources[bad], np.roll(kernel_at(*centres[bad]), 2, axis=1), mode="same") + 3.0
    targets += 0.01 * rng.normal(size=targets.shape)
    result = lstsq_kernels(sources, targets, kernel_size=k, robust=False, statistics=True)
    stats = TileStatistics.from_lstsq(result, centres[:, 0], centres[:, 1])
    kept = fit_joint_field(stats, degrees=[1], strengths=[1.0], clip=4.0)
    assert np.flatnonzero(kept.field.rejected).tolist() == [bad]
    assert not kept.field.used[bad]
    kept_error = np.abs(kept.field.coefficients[:2] - np.stack([base, slope])).max()
    every = fit_joint_field(stats, degrees=[1], strengths=[1.0])  # no rejection by default
    assert not every.field.rejected.any()
    every_error = np.abs(every.field.coefficients[:2] - np.stack([base, slope])).max()
    assert kept_error < 1e-3 < every_error


@given(n=st.integers(1, 9), m=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), single=st.booleans())
def test_packed_grams_in_chunks_index_trace_and_quadratic_as_the_matrices_do(n, m, seed, single):
    """Also packed in single precision (as a run keeps them): the matrices they hold, in double precision."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, m, m))
    a = a + a.transpose(0, 2, 1)
    dtype = np.float32 if single else None
    if single:
        a = a.astype(np.float32).astype(np.float64)  # the matrices single-precision values hold
    order = rng.permutation(n)  # the matrix of each stored row
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False)) if n > 1 else []
    assert pack_gram(a, dtype).flags.c_contiguous  # each matrix's values together
    assert pack_gram(a, dtype).dtype == (np.float32 if single else np.float64)
    packed = PackedGrams(np.split(pack_gram(a[order], dtype), cuts), m, order)  # in chunks, as blocks return them
    assert packed.shape == a.shape and len(packed) == n
    assert packed[:].dtype == packed.traces().dtype == np.float64
    np.testing.assert_array_equal(packed[:], a)
    np.testing.assert_array_equal(packed[n - 1], a[n - 1])
    some = rng.choice(n, size=rng.integers(1, n + 1), replace=False)
    np.testing.assert_array_equal(packed[some], a[some])
    np.testing.assert_array_equal(packed.rows(some), pack_gram(a[some]))
    np.testing.assert_allclose(packed.traces(), np.trace(a, axis1=1, axis2=2), rtol=1e-12, atol=1e-12)
    weights = rng.normal(size=(len(some), 3))
    sums = packed.weighted_sums(some, weights, budget=8 * len(some) * 70)  # bands of 70 values (or 64)
    assert sums.dtype == np.float64
    np.testing.assert_allclose(sums, weights.T @ pack_gram(a[some]), rtol=1e-12,
                               atol=1e-12 * np.abs(weights).sum(axis=0).max() * np.abs(a).max())
    whole = PackedGrams(pack_gram(a, dtype), m)  # one chunk, in turn: the same sums
    np.testing.assert_array_equal(whole.weighted_sums(some, weights, budget=8 * len(some) * 70), sums)
    vectors = rng.normal(size=(len(some), m))
    np.testing.assert_allclose(packed.quadratic(vectors, some), np.einsum("ti,tij,tj->t", vectors, a[some], vectors),
                               rtol=1e-10, atol=1e-10 * np.abs(a).max() * np.sum(vectors**2, axis=1).max())


def test_packed_grams_refuse_an_order_that_is_not_a_permutation():
    with pytest.raises(ValueError, match="each of the 3 matrices once"):
        PackedGrams(pack_gram(np.zeros((3, 2, 2))), 2, np.array([0, 0, 2]))


@pytest.mark.parametrize("core_radius, chunks", [(None, 1), (1.0, 1), (1.0, 3)])
def test_a_fit_from_packed_grams_equals_the_fit_from_the_matrices(core_radius, chunks):
    """Also from Grams in chunks (the blocks' own arrays, their rows in another order), with some tiles
    unusable."""
    rng = np.random.default_rng(14)
    k = 3
    stats = _grid_statistics(4, k, rng)
    count = stats.count.copy()
    if chunks > 1:
        count[[2, 9]] = 0  # not usable
    stats = TileStatistics(stats.gc, stats.cc, stats.yy, count, stats.y, stats.x, stats.lam)
    order = np.random.default_rng(3).permutation(16) if chunks > 1 else np.arange(16)  # stored rows' tiles
    packed = TileStatistics(PackedGrams(np.array_split(pack_gram(stats.gc[order]), chunks), k * k, order), stats.cc,
                            stats.yy, stats.count, stats.y, stats.x, stats.lam)
    options = {"criterion": "pixels", "core_radius": core_radius, "max_degree": 2}
    plain, compact = fit_joint_field(stats, **options), fit_joint_field(packed, **options)
    assert compact.field.degree == plain.field.degree and compact.strength == plain.strength
    np.testing.assert_allclose(compact.field.coefficients, plain.field.coefficients, rtol=1e-9,
                               atol=1e-12 * np.abs(plain.field.coefficients).max())
    assert compact.scores.keys() == plain.scores.keys()
    np.testing.assert_allclose(list(compact.scores.values()), list(plain.scores.values()), rtol=1e-9)
