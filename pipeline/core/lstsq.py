"""Exact least-squares kernel estimate over the valid region of each tile.

Unknowns: the ``k x k`` kernel and a constant background.  Only target pixels
whose whole kernel footprint lies inside the tile are fitted, so edges leave
no artifact.  The normal equations come from :mod:`pipeline.core.gram` (FFT
correlations plus exact boundary terms).  A bad target pixel removes its own
equation (all of them one low-rank downdate); a bad source pixel is filled
from its neighbours (:mod:`pipeline.core.fill`) and keeps its target pixels,
unless it sits in a cluster too dense to fill (or ``bad_source="exclude"``),
when every target pixel whose footprint covers it goes.

Regularisation adds ``sum_i mu_i ||D_i K||^2`` to the squared residual, with
``mu_i = lam_i * tr(G) / tr(D_i^T D_i)`` so that each ``lam_i`` is
dimensionless; the operators ``D_i`` of each penalty are in
:mod:`pipeline.core.penalties`.  The compact penalties are centred on the
kernel's core: the stamp centre, or, when a first fit finds the core more
than 0.75 px away (a shift between the images), that core, and the fit is
repeated.

With ``regularization="auto"`` every ``lam_i`` maximises the Bayesian
evidence (MacKay's fixed-point updates ``alpha_i = gamma_i / E_W,i``,
``beta = (n - gamma) / E_D``, traces from fixed Rademacher probes): the
noise level and the signal power of the tile set them, no truth needed.
A fixed ``regularization=lam`` uses that ``lam`` for every term (or one per term).

The robust pass (``robust=True``): before the first fit, defects nobody
marked (saturation plateaus, single-pixel spikes, :mod:`pipeline.core.defects`)
are treated as bad pixels; after it, up to three times, target pixels whose
residual exceeds ``clip`` sigmas of the tile's noise model (:func:`noise_model`,
or the images' known variances) are removed, grown into the defects they
belong to, and the kernel is solved again (``lam`` searched again when the
removed pixels held the noise level).
The options and their defaults are those of :class:`pipeline.core.options.LstsqOptions`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import label, maximum_filter

from .. import flags as fl
from ._lapack import cho_solve, cholesky, lower_solve
from .defects import saturation_plateau, spikes
from .fill import fill_bad_pixels
from .gram import design_rows, fft_shape, fit_region, valid_gram
from .options import LstsqOptions
from .penalties import PenaltyTerms, penalty_terms
from .validate import check_positive_int, either_bad

__all__ = ["LstsqResult", "lstsq_kernels", "noise_model"]

_LAM_MIN, _LAM_MAX = 1e-12, 1e8
#: Kernels whose core is off the stamp centre by more than this (px) get a recentred penalty.
_RECENTRE = 0.75
#: Re-run the evidence search after clipping only when more pixels than this fraction went ...
_RESEARCH_FRACTION = 0.002
#: ... or when they held more than this share of the squared residuals (they set the noise level).
_RESEARCH_SHARE = 0.01
#: Most clip-and-refit passes of the robust fit (each judges the residuals of the previous fit).
_ROBUST_PASSES = 3
#: Outlier clusters larger than this (pixels) exclude a whole kernel footprint around them.
_CLUSTER = 8


@dataclass(frozen=True)
class LstsqResult:
    """Per-tile output of :func:`lstsq_kernels` (arrays over the batch)."""

    kernels: np.ndarray  #: ``(n, k, k)`` float64
    background: np.ndarray  #: ``(n,)`` constant offset of the target
    lam: np.ndarray  #: ``(n,)`` geometric mean of the dimensionless ``lam_i`` used
    lam_terms: np.ndarray  #: ``(n, m)`` the ``lam_i`` of each penalty term
    n_valid: np.ndarray  #: ``(n,)`` target pixels fitted
    n_clipped: np.ndarray  #: ``(n,)`` pixels removed by the robust pass
    flux_error: np.ndarray  #: ``(n,)`` standard error of the kernel sum
    effective_parameters: np.ndarray  #: ``(n,)`` well-determined kernel parameters
    masked: np.ndarray  #: ``(n,)`` bool: bad pixels took target pixels out of the fit
    no_data: np.ndarray  #: ``(n,)`` bool: too few valid pixels per unknown; no fit
    no_signal: np.ndarray  #: ``(n,)`` bool: the source has no usable power; no kernel
    at_bound: np.ndarray  #: ``(n,)`` bool: the evidence search ended at its upper bound
    n_filled: np.ndarray  #: ``(n,)`` bad source pixels filled from their neighbours
    noise: np.ndarray  #: ``(n,)`` robust (MAD) standard deviation of the fit residual over the fitted pixels
    #: ``(n,)`` RMS residual of the final kernel over the fit region (clipped pixels included) / noise
    residual: np.ndarray
    snr: np.ndarray  #: ``(n,)`` RMS of the model ``K * source`` over the fitted pixels / noise
    #: with ``statistics=True``: ``(gc, cc, yy)`` of the final fit region, ``(n, k*k, k*k)``,
    #: ``(n, k*k)``, ``(n,)`` with the background profiled out (NaN where no kernel); else ``None``
    statistics: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def flags(self) -> np.ndarray:
        """``(n,)`` quality bits of these facts, see :func:`pipeline.flags.fit_flags`."""
        return fl.fit_flags(masked=self.masked, no_data=self.no_data, no_signal=self.no_signal,
                            outliers_clipped=self.n_clipped > 0, regularization_at_bound=self.at_bound)


def _kernel_centre(kernel: np.ndarray, kernel_size: int) -> tuple[float, float]:
    """Centroid offset of the kernel's positive core, in pixels from the stamp centre."""
    k = kernel.reshape(kernel_size, kernel_size)
    peak = np.unravel_index(np.argmax(k), k.shape)
    h = kernel_size // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    near = (yy - (peak[0] - h)) ** 2 + (xx - (peak[1] - h)) ** 2 <= max(h / 3.0, 1.5) ** 2
    weight = np.where(near, np.clip(k, 0.0, None), 0.0)
    total = weight.sum()
    if not total > 0:
        return 0.0, 0.0
    return float((weight * yy).sum() / total), float((weight * xx).sum() / total)


class _Tile:
    """Normal equations of one tile, with the background eliminated."""

    def __init__(self, gram, colsum, rhs, rsum, rsq, count, penalty: PenaltyTerms):
        self.gram, self.colsum, self.rhs = gram, colsum, rhs
        self.rsum, self.rsq, self.count = rsum, rsq, count
        self.penalty = penalty
        self.refresh()

    def refresh(self) -> None:
        n = self.count
        self.gc = self.gram - np.outer(self.colsum, self.colsum) / n
        self.cc = self.rhs - self.colsum * (self.rsum / n)
        self.yy = self.rsq - self.rsum**2 / n
        self.scale = np.trace(self.gc) / self.penalty.traces

    def statistics(self) -> _Statistics:
        """The background-free sufficient statistics as they are now (no copy: they are replaced, never changed)."""
        return _Statistics(self.gc, self.cc, self.yy, self.count)

    def remove(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Drop target pixels (design rows and target values) from the fit."""
        self.gram = self.gram - rows.T @ rows
        self.colsum = self.colsum - rows.sum(axis=0)
        self.rhs = self.rhs - rows.T @ values
        self.rsum -= values.sum()
        self.rsq -= values @ values
        self.count -= len(values)
        self.refresh()

    def solve(self, lam: np.ndarray, *, fast: bool = False):
        """Kernel and evidence quantities at ``lam``; ``None`` if not positive definite.

        ``fast`` factorises in single precision and refines the kernel once in
        double precision (cheaper; used while searching ``lam``), and
        falls back to double precision when the system is too ill-conditioned
        for that.  LAPACK runs without the GIL, so threads factorise tiles in
        parallel.
        """
        pen = self.penalty
        mu = lam * self.scale
        a = self.gc.copy()
        flat = a.reshape(-1)
        for m, g, idx in zip(mu, pen.grams, pen.flat_index):
            flat[idx] += m * g.data
        rhs = self.cc
        kern = None
        if fast:
            chol, info = cholesky(a.astype(np.float32))
            if info == 0:
                kern = _refined(a, chol, rhs, 1e-7)
        if kern is None:
            chol, info = cholesky(a)
            if info != 0:
                return None
            kern = cho_solve(chol, rhs)
        if not np.all(np.isfinite(kern)):
            return None
        ew = np.array([kern @ (g @ kern) for g in pen.grams])
        ed = self.statistics().rss(kern)
        probes = pen.probes32 if chol.dtype == np.float32 else pen.probes64
        w = lower_solve(chol, probes)
        per_probe = np.einsum("ij,ij->i", w, w, dtype=np.float64)
        traces = per_probe.reshape(len(mu), pen.n_probes).mean(axis=1)
        suppressed = mu * traces
        gamma = float(np.clip(len(kern) - suppressed.sum(), 0.0, len(kern)))
        return _Solution(kern, chol, ew, ed, gamma, suppressed, a)

    def update(self, lam: np.ndarray):
        """One evidence fixed-point update; returns (new lam, solution) or None."""
        sol = self.solve(lam, fast=True)
        if sol is None:
            return None
        k2 = len(sol.kernel)
        dof = self.count - 1 - sol.gamma
        if sol.ed <= 0 or dof <= 0:
            return np.full_like(lam, _LAM_MIN), sol
        beta = dof / sol.ed
        gamma_i = np.clip(k2 - sol.suppressed, 1e-3, k2)
        with np.errstate(divide="ignore"):
            mu_new = gamma_i / (beta * sol.ew)
        lam_new = np.where(sol.ew > 0, mu_new / self.scale, _LAM_MAX)
        return lam_new, sol


@dataclass(frozen=True)
class _Statistics:
    """``Gc``, ``c`` and ``yy`` of a fit region (background profiled out) and its pixel count."""

    gc: np.ndarray
    cc: np.ndarray
    yy: float
    count: int

    def rss(self, kernel: np.ndarray) -> float:
        """Residual sum of squares of ``kernel`` (with its best background) over the region."""
        return max(self.yy - 2.0 * (kernel @ self.cc) + kernel @ (self.gc @ kernel), 0.0)


@dataclass
class _Solution:
    kernel: np.ndarray
    chol: np.ndarray
    ew: np.ndarray
    ed: float
    gamma: float
    suppressed: np.ndarray
    matrix: np.ndarray  #: the regularised normal matrix (float64)

    def polished(self, rhs: np.ndarray) -> np.ndarray:
        """The kernel to double precision: refined further with a single-precision factor,
        or solved again in double precision where refinement does not converge."""
        if self.chol.dtype == np.float64:
            return self.kernel
        kern = _refined(self.matrix, self.chol, rhs, 1e-10, self.kernel, steps=2)
        if kern is None:
            chol, info = cholesky(self.matrix)
            kern = cho_solve(chol, rhs) if info == 0 else self.kernel
        return kern


def _refined(a: np.ndarray, chol: np.ndarray, rhs: np.ndarray, rtol: float,
             start: np.ndarray | None = None, steps: int = 1) -> np.ndarray | None:
    """Solve ``a x = rhs`` by ``steps`` of iterative refinement with a single-precision factor of ``a``.

    Returns ``None`` unless the residual is then below ``rtol * |rhs|``.  A
    fixed number of steps and a tolerance far above rounding keep the result
    a function of the inputs alone (no branch decided by rounding noise).
    """
    kern = cho_solve(chol, rhs).astype(np.float64) if start is None else start.copy()
    for _ in range(steps):
        kern += cho_solve(chol, rhs - a @ kern)
    return kern if np.linalg.norm(rhs - a @ kern) <= rtol * np.linalg.norm(rhs) else None


def _search_lam(tile: _Tile, lam0: np.ndarray, *, tol: float, max_iter: int):
    """Evidence-maximising ``lam`` by accelerated fixed-point iteration in ``log lam``.

    Returns ``(solution, lam, at_bound)``: the last step's (single-precision
    factor, refined) solution and the ``lam`` it was solved at;
    ``solution`` is ``None`` when no ``lam`` in range gives a positive
    definite system.
    """
    lo, hi = np.log(_LAM_MIN), np.log(_LAM_MAX)
    x = np.clip(np.log(lam0), lo, hi)
    prev: tuple[np.ndarray, np.ndarray] | None = None  # previous (x, g)
    sol, solved_at = None, x
    for _ in range(max_iter):
        result = tile.update(np.exp(x))
        while result is None:  # not positive definite: regularise more
            if np.all(x >= hi):
                return None, np.exp(x), True
            x = np.minimum(x + np.log(10.0), hi)
            prev = None
            result = tile.update(np.exp(x))
        lam_new, sol = result
        solved_at = x
        g = np.log(np.maximum(lam_new, _LAM_MIN * 1e-3)) - x  # fixed-point residual
        if np.max(np.abs(g)) < tol:
            break  # ``x`` is within ``tol`` of the fixed point
        step = g
        if prev is not None:
            # secant on g, per term: the map contracts, so the slope of g lies
            # in (-2, 0); anything else falls back to the plain update
            dx, dg = x - prev[0], g - prev[1]
            slope = np.where(np.abs(dx) > 1e-12, dg / np.where(np.abs(dx) > 1e-12, dx, 1.0), 0.0)
            good = (slope < -0.1) & (slope > -5.0)
            step = np.where(good, -g / np.where(good, slope, 1.0), g)
        prev = (x, g)
        x = np.clip(x + np.clip(step, -3.0, 3.0), lo, hi)
    # the lower bound only means the data need no regularisation; the upper one
    # means the data say nothing the prior does not
    at_bound = bool(np.any(solved_at >= hi - tol))
    return sol, np.exp(solved_at), at_bound


def lstsq_kernels(
    sources: np.ndarray,
    targets: np.ndarray,
    bad: np.ndarray | None = None,
    *,
    kernel_size: int,
    options: LstsqOptions | None = None,
    source_bad: np.ndarray | None = None,
    target_bad: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    source_variance: np.ndarray | None = None,
    chunk: int = 4,
    statistics: bool = False,
    **option_keywords: Any,
) -> LstsqResult:
    """Exact regularised least-squares kernels for a batch of tiles.

    Parameters
    ----------
    sources, targets
        ``(n, ny, nx)`` float64 tiles; bad pixels must already be finite
        (e.g. zero) and marked in ``bad``, ``source_bad`` or ``target_bad``.
    bad
        ``(n, ny, nx)`` bool, True where a pixel is bad in both images (a
        user's mask).
    source_bad, target_bad
        ``(n, ny, nx)`` bool, pixels bad in one image only.  A bad target
        pixel removes its own equation.  A bad source pixel is filled from
        its neighbours (option ``bad_source="fill"``, see
        :mod:`pipeline.core.fill`), or, if it cannot be filled or with
        ``bad_source="exclude"``, removes every target pixel whose kernel
        footprint covers it.
    variance, source_variance
        Optional ``(n, ny, nx)`` per-pixel variances of the target and the
        source (finite where the pixel is good).  The robust pass then judges
        each residual against ``variance + K^2 * source_variance`` (rescaled
        by the residuals' robust spread, so a variance off by a constant
        factor still clips at ``clip`` sigmas) instead of the noise model it
        fits itself.  The least-squares fit stays unweighted.
    kernel_size
        Odd kernel side ``k``.
    options
        :class:`~pipeline.core.options.LstsqOptions` (regularization, penalty,
        robust, recentre, clip and the search's settings); keyword options
        (``penalty="wings"``, ...) are applied on top.
    chunk
        Tiles transformed together (bounds memory).
    statistics
        Also return each tile's background-free normal equations of its final
        fit region (``LstsqResult.statistics``: ``k**4`` floats a tile), for
        :mod:`pipeline.core.joint`.
    """
    opts = LstsqOptions.resolve(options, option_keywords)
    chunk = check_positive_int("chunk", chunk)
    penalty, n_probes, recentre, robust = opts.penalty, opts.n_probes, opts.recentre, opts.robust
    min_pixels_per_parameter = opts.min_pixels_per_parameter
    pen = penalty_terms(kernel_size, penalty, n_probes)
    n_terms = len(pen.grams)
    auto_lam = opts.auto
    lam_fixed = opts.fixed_lam()
    if kernel_size == 1 and auto_lam:  # one unknown, fixed by every pixel: nothing to regularise (and the
        auto_lam, lam_fixed = False, np.full(len(pen.grams), _LAM_MIN)  # compact penalties' terms coincide)
    n, ny, nx = sources.shape
    half = kernel_size // 2
    k2 = kernel_size * kernel_size
    shape = fft_shape((ny, nx), half)
    box = fit_region(np.zeros((1, ny, nx), dtype=bool), kernel_size)[0]
    lag = np.arange(kernel_size) - half
    src_side = either_bad(bad, source_bad)
    tgt_side = either_bad(bad, target_bad)

    kernels = np.full((n, kernel_size, kernel_size), np.nan)
    background = np.full(n, np.nan)
    lam_out = np.full(n, np.nan)
    lam_terms = np.full((n, n_terms), np.nan)
    n_valid = np.zeros(n, dtype=np.int64)
    n_clipped = np.zeros(n, dtype=np.int64)
    n_filled = np.zeros(n, dtype=np.int64)
    flux_error = np.full(n, np.nan)
    gamma_out = np.full(n, np.nan)
    noise_out = np.full(n, np.nan)
    residual_out = np.full(n, np.nan)
    snr_out = np.full(n, np.nan)
    masked_out = np.zeros(n, dtype=bool)
    no_data = np.zeros(n, dtype=bool)
    no_signal = np.zeros(n, dtype=bool)
    at_bound_out = np.zeros(n, dtype=bool)
    lam_start = np.full(n_terms, float(opts.lam_init))
    # the Grams are set tile by tile, NaN at the end where no kernel was fitted (no 8 k**4-byte fill first)
    stats_out = (np.empty((n, k2, k2)), np.full((n, k2), np.nan), np.full(n, np.nan)) if statistics else None

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        src = np.asarray(sources[start:stop], dtype=np.float64)
        tgt = np.asarray(targets[start:stop], dtype=np.float64)
        sb = None if src_side is None else np.asarray(src_side[start:stop], dtype=bool)
        tb = None if tgt_side is None else np.asarray(tgt_side[start:stop], dtype=bool)
        pixels = [_tile_pixels(src[i], tgt[i], None if sb is None else sb[i], None if tb is None else tb[i],
                               kernel_size=kernel_size, box=box, fill=opts.bad_source == "fill", find=robust)
                  for i in range(m)]
        src = np.stack([p.source for p in pixels])
        valid = np.stack([p.valid for p in pixels])
        masked = np.array([p.masked for p in pixels])
        n_filled[start:stop] = [p.n_filled for p in pixels]
        dropped = box & ~valid  # pixels of the valid box lost to bad pixels
        reduced = dropped.reshape(m, -1).any(axis=1)
        weights = valid[reduced].astype(np.float64)
        # correlations of the source with the masked target (right-hand side)
        # and, where pixels were dropped, with the fit region (background column)
        spec = sfft.rfft2(np.concatenate([src, tgt * valid, weights]), s=shape)
        fs, fr, fw = spec[:m], spec[m : 2 * m], spec[2 * m :]
        cross = sfft.irfft2(np.concatenate([np.conj(fs) * fr, np.conj(fs[reduced]) * fw]), s=shape)
        cross = cross[:, (lag % shape[0])[:, None], (lag % shape[1])[None, :]].reshape(-1, k2)
        colsums = _box_sums(src, half)
        colsums[reduced] = cross[m:]
        grams = valid_gram(src, half, spectra=fs)

        for i in range(m):
            t = start + i
            count = int(valid[i].sum())
            n_valid[t] = count
            masked_out[t] = masked[i]
            if count < min_pixels_per_parameter * (k2 + 1):
                no_data[t] = True
                continue
            gram = grams[i]
            if reduced[i]:
                rows = np.ascontiguousarray(design_rows(src[i], half, np.nonzero(dropped[i])))
                gram = gram - rows.T @ rows
            vals = tgt[i][valid[i]]
            tile = _Tile(gram, colsums[i], cross[i], float(vals.sum()), float(vals @ vals),
                         count, pen)
            before = tile.statistics()  # the whole fit region, for the residual diagnostic
            fitted = valid[i].copy()
            found = pixels[i].found_target
            if found is not None:  # spikes and saturated cores found in the target: out before any fit
                tile.remove(np.ascontiguousarray(design_rows(src[i], half, found)), tgt[i][found])
                fitted[found] = False
                n_valid[t] = tile.count
            n_clipped[t] = pixels[i].n_found
            if tile.count < min_pixels_per_parameter * (k2 + 1):
                no_data[t] = True
                continue
            src_vals = src[i][fitted]
            src_level = float(np.mean(src_vals**2)) + np.finfo(float).tiny
            if not np.all(np.isfinite(tile.scale)) or np.trace(tile.gc) <= 1e-12 * src_level * tile.count * k2:
                no_signal[t] = True
                continue

            def fit(lam_start: np.ndarray):
                if auto_lam:
                    return _search_lam(tile, lam_start, tol=opts.tol, max_iter=opts.max_iter)  # noqa: B023
                return tile.solve(lam_fixed), lam_fixed, False  # noqa: B023 - called in this iteration only

            sol, lam, at_bound = fit(lam_start)
            if sol is not None and recentre and penalty in ("compact", "wings"):
                # a shifted kernel: centre the compact penalty on it and refit
                cy, cx = _kernel_centre(sol.kernel, kernel_size)
                if max(abs(cy), abs(cx)) > _RECENTRE:
                    tile.penalty = penalty_terms(
                        kernel_size, penalty, n_probes, (round(cy * 4) / 4, round(cx * 4) / 4)
                    )
                    tile.refresh()
                    sol, lam, at_bound = fit(lam_start if at_bound else lam)
            if sol is None:
                no_signal[t] = True
                continue
            resid, model = _residuals(tile, sol.kernel, fs[i], shape, tgt[i], fitted)
            known = None if not robust or (variance is None and source_variance is None) else _KnownVariance(
                None if variance is None else np.asarray(variance[t], dtype=np.float64),
                None if source_variance is None else np.asarray(source_variance[t], dtype=np.float64), shape)
            for _ in range(_ROBUST_PASSES if robust else 0):
                pixel_var = None if known is None else known.of(sol.kernel, fitted)
                out, share = _outliers(resid, model, opts.clip, pixel_var)
                if not out.any():
                    break
                pix = np.nonzero(fitted)
                pix = _grown(pix[0][out], pix[1][out], fitted, half)
                if tile.count - len(pix[0]) < min_pixels_per_parameter * (k2 + 1):
                    break  # too few pixels would remain: keep the fit as it is
                tile.remove(np.ascontiguousarray(design_rows(src[i], half, pix)), tgt[i][pix])
                fitted[pix] = False
                n_clipped[t] += len(pix[0])
                n_valid[t] = tile.count
                if auto_lam and (len(pix[0]) > _RESEARCH_FRACTION * count or share > _RESEARCH_SHARE):
                    sol, lam, at_bound = fit(lam_start if at_bound else lam)
                else:  # a few pixels that barely move the evidence optimum
                    sol = tile.solve(lam, fast=auto_lam)
                if sol is None:
                    break
                resid, model = _residuals(tile, sol.kernel, fs[i], shape, tgt[i], fitted)
            if sol is None:
                no_signal[t] = True
                continue
            noise = _robust_sigma(resid)  # of the final kernel, over the pixels it fits
            at_bound_out[t] = at_bound
            kern = sol.polished(tile.cc)
            kernels[t] = kern.reshape(kernel_size, kernel_size)
            background[t] = (tile.rsum - kern @ tile.colsum) / tile.count
            lam_out[t] = float(np.exp(np.mean(np.log(np.maximum(lam, _LAM_MIN)))))
            lam_terms[t] = lam
            gamma_out[t] = sol.gamma
            dof = max(tile.count - 1 - sol.gamma, 1.0)
            ones = cho_solve(sol.chol, np.ones(k2)).astype(np.float64)
            flux_error[t] = np.sqrt(sol.ed / dof * ones.sum())
            noise_out[t] = noise
            with np.errstate(divide="ignore", invalid="ignore"):
                residual_out[t] = np.sqrt(before.rss(kern) / before.count) / noise
                snr_out[t] = np.sqrt(max(kern @ (tile.gc @ kern), 0.0) / tile.count) / noise
            if stats_out is not None:
                stats_out[0][t], stats_out[1][t], stats_out[2][t] = tile.gc, tile.cc, tile.yy

    if stats_out is not None:
        stats_out[0][np.isnan(stats_out[2])] = np.nan
    return LstsqResult(kernels, background, lam_out, lam_terms, n_valid, n_clipped, flux_error,
                       gamma_out, masked_out, no_data, no_signal, at_bound_out, n_filled,
                       noise_out, residual_out, snr_out, stats_out)


def _residuals(tile: _Tile, kernel: np.ndarray, spectrum: np.ndarray, shape: tuple[int, int],
               target: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residuals ``target - kernel * source - background`` and the model ``kernel * source``
    over the fit region (1-D arrays in raster order).

    ``spectrum`` is the source's ``rfft2`` at FFT size ``shape``.
    """
    half = (int(round(np.sqrt(kernel.size))) - 1) // 2
    model = _model(spectrum, kernel, shape, target.shape, half)[valid]
    return target[valid] - model - (tile.rsum - kernel @ tile.colsum) / tile.count, model


def _robust_sigma(resid: np.ndarray) -> float:
    """Robust (MAD) standard deviation of residuals, from at most 16384 evenly spread samples."""
    sample = resid[:: max(1, resid.size // 16384)]
    return float(1.4826 * np.median(np.abs(sample - np.median(sample))))


#: Upper quantiles of the model's signal at which the noise model measures the residuals' spread.
_NOISE_QUANTILES = np.array([0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 1.0])


def noise_model(resid: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    """Per-tile noise model ``var = a + b * max(model, 0)`` of the fit residuals.

    ``a`` is the robust variance where the model is faint (sky and read
    noise), ``b`` the slope of the robust variance against the signal in
    brighter quantiles of the model (the Poisson term of both images):
    each quantile bin's MAD variance, medians throughout, so that outliers
    (saturated cores, cosmic rays) do not inflate it.
    """
    edges = (_NOISE_QUANTILES * len(model)).astype(int)
    order = np.argpartition(model, edges[edges < len(model)])  # each quantile bin's pixels, unsorted
    faint = resid[order[: edges[0]]]
    a = _robust_sigma(faint) ** 2
    slopes, weights = [], []
    for lo, hi in itertools.pairwise(edges):
        if hi - lo < 16:
            continue
        sel = order[lo:hi]
        level = float(np.median(model[sel]))
        if level <= 0:
            continue
        slopes.append((_robust_sigma(resid[sel]) ** 2 - a) / level)
        weights.append(level * np.sqrt(hi - lo))  # bright, well-populated bins measure the slope best
    if not slopes:
        return a, 0.0
    order_s = np.argsort(slopes)
    cum = np.cumsum(np.asarray(weights)[order_s])
    b = float(np.asarray(slopes)[order_s][np.searchsorted(cum, 0.5 * cum[-1])])  # weighted median
    return a, max(b, 0.0)


@dataclass(frozen=True)
class _Pixels:
    """Which pixels of one tile the fit uses, and why others are not."""

    source: np.ndarray  #: the source, bad pixels filled (or zero where they could not be)
    valid: np.ndarray  #: the fit region: target pixels whose footprint holds no unfilled bad source pixel
    found_target: tuple[np.ndarray, np.ndarray] | None  #: target pixels of ``valid`` found bad (spikes, cores)
    masked: bool  #: known bad pixels (NaN, mask) reach the fit
    n_filled: int  #: bad source pixels filled
    n_found: int  #: defects found in the pixels (both images) that the fit leaves out


def _tile_pixels(source: np.ndarray, target: np.ndarray, source_bad: np.ndarray | None,
                 target_bad: np.ndarray | None, *, kernel_size: int, box: np.ndarray, fill: bool,
                 find: bool) -> _Pixels:
    """The fit's pixels of one tile: known bad pixels, and with ``find`` the defects found blind.

    Bad source pixels (known, or spikes found) are filled where they can be
    (with ``fill``) and otherwise exclude their footprints, as do saturation
    plateaus of the source; bad target pixels remove their own equations.
    """
    shape = source.shape
    src_bad = np.zeros(shape, dtype=bool) if source_bad is None else source_bad
    tgt_bad = np.zeros(shape, dtype=bool) if target_bad is None else target_bad
    masked = bool(src_bad.any() or (tgt_bad & box).any())
    plateau = spiked = found_tgt = np.zeros(shape, dtype=bool)
    if find:
        plateau = saturation_plateau(source, ~src_bad)
        spiked = spikes(source, ~(src_bad | plateau), target, ~tgt_bad)
        found_tgt = (saturation_plateau(target, ~tgt_bad) | spikes(target, ~tgt_bad, source, ~src_bad)) & ~tgt_bad
    to_fill = src_bad | spiked
    excluded = plateau.copy()
    n_filled = 0
    if to_fill.any():
        if fill:
            source, unfilled = fill_bad_pixels(source, to_fill)
            excluded |= unfilled
            n_filled = int(to_fill.sum() - unfilled.sum())
        else:
            excluded |= to_fill
    valid = fit_region(excluded[None], kernel_size)[0] & ~tgt_bad
    found = valid & found_tgt
    n_found = int(plateau.sum() + spiked.sum() + found.sum())
    return _Pixels(source, valid, np.nonzero(found) if found.any() else None, masked, n_filled, n_found)


def _grown(ys: np.ndarray, xs: np.ndarray, fitted: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Outlying pixels grown into the defects they belong to, restricted to ``fitted`` pixels.

    Every outlier takes its 8 neighbours (the faint edges of cosmic-ray
    tracks); a cluster of more than :data:`_CLUSTER` outliers (a saturated
    core, a bleed trail, or the imprint of a defect in the *source*, which
    spreads over a whole kernel footprint) takes everything within the
    kernel's half-size ``half``.
    """
    out = np.zeros(fitted.shape, dtype=bool)
    out[ys, xs] = True
    labels, _ = label(out, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())
    big = sizes[labels] > _CLUSTER
    big[labels == 0] = False
    grown = maximum_filter(out.view(np.uint8), size=3).astype(bool)
    if big.any():
        grown |= maximum_filter(big.view(np.uint8), size=2 * half + 1).astype(bool)
    return np.nonzero(grown & fitted)


class _KnownVariance:
    """The variance of each residual from the images' known variances: ``var_T + K^2 * var_S``."""

    def __init__(self, target: np.ndarray | None, source: np.ndarray | None, shape: tuple[int, int]):
        self.target, self.shape = target, shape
        self.source_spectrum = None if source is None else sfft.rfft2(source, s=shape)
        self.tile_shape = (target if target is not None else source).shape

    def of(self, kernel: np.ndarray, fitted: np.ndarray) -> np.ndarray:
        """Variances of the ``fitted`` pixels' residuals (1-D, raster order)."""
        var = np.zeros(int(fitted.sum())) if self.target is None else self.target[fitted]
        if self.source_spectrum is not None:
            half = (int(round(np.sqrt(kernel.size))) - 1) // 2
            var = var + _model(self.source_spectrum, kernel**2, self.shape, self.tile_shape, half)[fitted]
        return var


def _outliers(resid: np.ndarray, model: np.ndarray, clip: float,
              variance: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Residuals beyond ``clip`` sigmas, and their share of the squared residuals.

    ``resid`` and ``model`` are the residuals and the model over the fitted
    pixels; sigma is :func:`noise_model`'s, or, where the pixels' ``variance``
    is known, its square root times the robust spread of the residuals so
    scaled.
    """
    every = max(1, resid.size // 16384)  # the noise model needs no more pixels
    centre = np.median(resid[::every])
    if variance is None:
        a, b = noise_model(resid[::every], model[::every])
        sigma = np.sqrt(a + b * np.maximum(model, 0.0))
    else:
        sigma = np.sqrt(np.maximum(variance, 0.0))
        scaled = (resid - centre)[::every] / np.where(sigma[::every] > 0, sigma[::every], np.inf)
        sigma = sigma * max(_robust_sigma(scaled), np.finfo(float).tiny)
    out = np.abs(resid - centre) > clip * sigma
    total = float(resid @ resid)
    return out, float(resid[out] @ resid[out]) / total if total > 0 else 0.0


def _box_sums(sources: np.ndarray, half: int) -> np.ndarray:
    """``sum_{p in V} S(p - a_j)`` for every kernel offset: the background column.

    ``V`` is the valid box; the box of offset ``j`` covers rows
    ``[2h - jy, ny - jy)`` and likewise columns.  Rows shared by every offset
    are summed once, the ``2h`` edge rows on either side enter as running
    sums, then columns the same way.  Returns ``(n, k*k)``.
    """
    n, ny, nx = sources.shape
    w = 2 * half
    k = w + 1
    start = w - np.arange(k)
    if ny >= 2 * w:
        rows = np.repeat(sources[:, w : ny - w].sum(axis=1)[:, None], k, axis=1)  # [n, jy, x]
        if w:
            rows[:, 1:] += np.cumsum(sources[:, w - 1 :: -1], axis=1)  # rows w-jy .. w-1
            rows[:, :w] += np.cumsum(sources[:, ny - w :], axis=1)[:, ::-1]  # rows ny-w .. ny-1-jy
    else:  # edge bands overlap: an integral over all rows
        integral_y = np.zeros((n, ny + 1, nx))
        np.cumsum(sources, axis=1, out=integral_y[:, 1:])
        rows = integral_y[:, start + ny - w] - integral_y[:, start]
    integral = np.zeros((n, k, nx + 1))
    np.cumsum(rows, axis=2, out=integral[:, :, 1:])
    return (integral[:, :, start + nx - w] - integral[:, :, start]).reshape(n, k * k)


def _model(spectrum: np.ndarray, kernel: np.ndarray, shape, tile_shape, half: int) -> np.ndarray:
    """``kernel (*) source`` on the tile, from the padded source spectrum."""
    k = 2 * half + 1
    kern = kernel.reshape(k, k)
    fk = sfft.rfft2(kern, s=shape)
    full = sfft.irfft2(spectrum * fk, s=shape)
    return full[half : half + tile_shape[0], half : half + tile_shape[1]]
