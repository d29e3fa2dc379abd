"""Exact least-squares kernel estimate over the valid region of each tile.

Unknowns: the ``k x k`` kernel and a constant background.  Only target pixels
whose whole kernel footprint lies inside the tile and contains no bad pixel
are fitted, so edges and bad pixels leave no artifact.  The normal equations
come from :mod:`pipeline.gram` (FFT correlations plus exact boundary terms);
bad pixels are removed from them as low-rank downdates.

Regularisation adds ``sum_i mu_i ||D_i K||^2`` to the squared residual, with
``mu_i = lam_i * tr(G) / tr(D_i^T D_i)`` so that each ``lam_i`` is
dimensionless.  Penalties (``penalty=``):

``"compact"`` (default)
    Two terms that describe a PSF-matching kernel: smoothness (the 5-point
    Laplacian) weighted by ``(r/h)^2``, so the core may be as sharp as the
    data say while the noise-dominated wings are kept smooth; and an
    amplitude term weighted by ``(r/h)^4`` that keeps power out of the outer
    stamp.  ``r`` is the distance from the stamp centre.  Measured on
    simulated survey tiles it roughly halves the kernel error of a plain
    Laplacian and removes most of its peak-flattening bias (kernel FWHM).
``"laplacian"``
    Plain smoothness ``||Laplacian K||^2`` (zero outside the stamp).
``"identity"``
    Tikhonov ``||K||^2``.

With ``regularization="auto"`` every ``lam_i`` maximises the Bayesian
evidence (MacKay's fixed-point updates ``alpha_i = gamma_i / E_W,i``,
``beta = (n - gamma) / E_D``, traces from fixed Rademacher probes): the
noise level and the signal power of the tile set them, no truth needed.
A fixed ``regularization=lam`` uses that ``lam`` for every term.  A robust
pass then excludes target pixels whose residual exceeds ``clip`` robust
standard deviations (cosmic rays, saturated cores, artefacts) and
re-converges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from scipy import sparse
from scipy.linalg import lapack
from scipy.ndimage import binary_dilation

from . import flags as fl
from .errors import OptionError
from .gram import design_rows, fft_shape, valid_gram

__all__ = ["PENALTIES", "LstsqResult", "lstsq_kernels", "penalty_operators"]

PENALTIES = ("compact", "laplacian", "identity")
_LAM_MIN, _LAM_MAX = 1e-12, 1e8
_CORE_SMOOTHING = 0.01
#: Re-run the evidence search after clipping only when more pixels than this fraction went.
_RESEARCH_FRACTION = 0.002


@dataclass(frozen=True)
class LstsqResult:
    """Per-tile output of :func:`lstsq_kernels` (arrays over the batch)."""

    kernels: np.ndarray  #: ``(n, k, k)`` float64
    background: np.ndarray  #: ``(n,)`` constant offset of the target
    lam: np.ndarray  #: ``(n,)`` geometric mean of the dimensionless ``lam_i`` used
    n_valid: np.ndarray  #: ``(n,)`` target pixels fitted
    n_clipped: np.ndarray  #: ``(n,)`` pixels removed by the robust pass
    flux_error: np.ndarray  #: ``(n,)`` standard error of the kernel sum
    effective_parameters: np.ndarray  #: ``(n,)`` well-determined kernel parameters
    flags: np.ndarray  #: ``(n,)`` quality bits, see :mod:`pipeline.flags`


def _laplacian(k: int) -> sparse.csr_matrix:
    """5-point Laplacian on the ``k x k`` stamp, zero outside it."""
    second = sparse.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(k, k))
    eye = sparse.identity(k)
    return sparse.csr_matrix(sparse.kron(eye, second) + sparse.kron(second, eye))


def _radius2(kernel_size: int) -> np.ndarray:
    """Squared radius from the stamp centre over ``h^2``, per pixel (raster order)."""
    h = max(kernel_size // 2, 1)
    yy, xx = np.mgrid[-(kernel_size // 2) : kernel_size // 2 + 1, -(kernel_size // 2) : kernel_size // 2 + 1]
    return ((yy**2 + xx**2) / h**2).ravel()


def _operators(kernel_size: int, penalty: str) -> tuple:
    """Penalty operators as sparse matrices."""
    k = kernel_size
    if penalty == "identity":
        return (sparse.identity(k * k, format="csr"),)
    lap = _laplacian(k)
    if penalty == "laplacian":
        return (lap,)
    rho2 = _radius2(k)
    return (
        sparse.diags(rho2 + _CORE_SMOOTHING) @ lap,
        sparse.diags(rho2**2 + 1e-4),
    )


def penalty_operators(kernel_size: int, penalty: str) -> tuple[np.ndarray, ...]:
    """Operators ``D_i`` (``k*k`` columns) of the penalty terms ``||D_i K||^2``."""
    if penalty not in PENALTIES:
        raise OptionError(f"penalty={penalty!r} is not known; choose one of {', '.join(PENALTIES)}")
    return tuple(op.toarray() for op in _operators(kernel_size, penalty))


def _terms(ops: tuple, n_probes: int):
    """Penalty Grams ``D_i^T D_i`` and probes ``D_i^T z`` (fixed Rademacher ``z``)."""
    rng = np.random.default_rng(20261126)
    grams, probes = [], []
    for op in ops:
        z = rng.choice([-1.0, 1.0], size=(op.shape[0], n_probes))
        grams.append((op.T @ op).toarray())
        probes.append(np.asarray(op.T @ z))
    return tuple(grams), tuple(probes)


@lru_cache(maxsize=16)
def _penalty_terms(kernel_size: int, penalty: str, n_probes: int):
    if penalty not in PENALTIES:
        raise OptionError(f"penalty={penalty!r} is not known; choose one of {', '.join(PENALTIES)}")
    grams, probes = _terms(_operators(kernel_size, penalty), n_probes)
    for arr in (*grams, *probes):
        arr.setflags(write=False)
    return grams, probes


class _Tile:
    """Normal equations of one tile, with the background eliminated."""

    def __init__(self, gram, colsum, rhs, rsum, rsq, count, penalty_grams, probes):
        self.gram, self.colsum, self.rhs = gram, colsum, rhs
        self.rsum, self.rsq, self.count = rsum, rsq, count
        self.penalty_grams = penalty_grams
        self.probes = probes
        self.prior_mean: np.ndarray | None = None
        self.refresh()

    def refresh(self) -> None:
        n = self.count
        self.gc = self.gram - np.outer(self.colsum, self.colsum) / n
        self.cc = self.rhs - self.colsum * (self.rsum / n)
        self.yy = self.rsq - self.rsum**2 / n
        tr = np.trace(self.gc)
        self.scale = np.array([tr / np.trace(p) for p in self.penalty_grams])

    def remove(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Drop target pixels (design rows and target values) from the fit."""
        self.gram = self.gram - rows.T @ rows
        self.colsum = self.colsum - rows.sum(axis=0)
        self.rhs = self.rhs - rows.T @ values
        self.rsum -= values.sum()
        self.rsq -= values @ values
        self.count -= len(values)
        self.refresh()

    def solve(self, lam: np.ndarray):
        """Kernel and evidence quantities at ``lam``; ``None`` if not positive definite."""
        mu = lam * self.scale
        a = self.gc.copy()
        for m, p in zip(mu, self.penalty_grams):
            a += m * p
        rhs = self.cc
        if self.prior_mean is not None:
            rhs = rhs + (a - self.gc) @ self.prior_mean
        chol, info = lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return None
        kern, info = lapack.dpotrs(chol, rhs, lower=1)
        if info != 0 or not np.all(np.isfinite(kern)):
            return None
        dev = kern if self.prior_mean is None else kern - self.prior_mean
        ew = np.array([dev @ (p @ dev) for p in self.penalty_grams])
        ed = max(self.yy - 2.0 * (kern @ self.cc) + kern @ (self.gc @ kern), 0.0)
        traces = np.empty(len(mu))
        for i, z in enumerate(self.probes):
            w, _ = lapack.dtrtrs(chol, z, lower=1)
            traces[i] = np.einsum("ij,ij->", w, w) / z.shape[1]
        suppressed = mu * traces
        gamma = float(np.clip(len(kern) - suppressed.sum(), 0.0, len(kern)))
        return _Solution(kern, chol, ew, ed, gamma, suppressed)

    def update(self, lam: np.ndarray):
        """One evidence fixed-point update; returns (new lam, solution) or None."""
        sol = self.solve(lam)
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


@dataclass
class _Solution:
    kernel: np.ndarray
    chol: np.ndarray
    ew: np.ndarray
    ed: float
    gamma: float
    suppressed: np.ndarray


def _search_lam(tile: _Tile, lam0: np.ndarray, *, tol: float, max_iter: int):
    """Evidence-maximising ``lam`` by accelerated fixed-point iteration in ``log lam``.

    Returns ``(solution, lam, at_bound)``; ``solution`` is ``None`` when no
    ``lam`` in range gives a positive definite system.
    """
    lo, hi = np.log(_LAM_MIN), np.log(_LAM_MAX)
    x = np.clip(np.log(lam0), lo, hi)
    prev_step = None
    sol = None
    for _ in range(max_iter):
        result = tile.update(np.exp(x))
        while result is None:  # not positive definite: regularise more
            if np.all(x >= hi):
                return None, np.exp(x), True
            x = np.minimum(x + np.log(10.0), hi)
            result = tile.update(np.exp(x))
        lam_new, sol = result
        step = np.clip(np.log(np.maximum(lam_new, _LAM_MIN * 1e-3)) - x, -3.0, 3.0)
        if np.max(np.abs(step)) < tol:
            break  # ``sol`` is the solution at ``x``, within ``tol`` of the fixed point
        if prev_step is not None:
            # Aitken-style extrapolation while steps shrink in the same direction
            ratio = np.where(prev_step != 0, step / np.where(prev_step != 0, prev_step, 1.0), 0.0)
            accel = (ratio > 0) & (ratio < 1)
            step = np.where(accel, step / np.maximum(1.0 - ratio, 0.25), step)
            step = np.clip(step, -3.0, 3.0)
        prev_step = step
        x = np.clip(x + step, lo, hi)
    # the lower bound only means the data need no regularisation; the upper one
    # means the data say nothing the prior does not
    at_bound = bool(np.any(x >= hi - tol))
    return sol, np.exp(x), at_bound


def _valid_box(shape: tuple[int, int], half: int) -> np.ndarray:
    box = np.zeros(shape, dtype=bool)
    box[half : shape[0] - half, half : shape[1] - half] = True
    return box


def lstsq_kernels(
    sources: np.ndarray,
    targets: np.ndarray,
    bad: np.ndarray | None = None,
    *,
    kernel_size: int,
    regularization: float | str = "auto",
    penalty: str = "compact",
    robust: bool = True,
    clip: float = 5.0,
    lam_init: float = 1.0,
    tol: float = 0.03,
    max_iter: int = 60,
    n_probes: int = 24,
    min_pixels_per_parameter: float = 2.0,
    chunk: int = 4,
) -> LstsqResult:
    """Exact regularised least-squares kernels for a batch of tiles.

    Parameters
    ----------
    sources, targets
        ``(n, ny, nx)`` float64 tiles; bad pixels must already be finite
        (e.g. zero) and marked in ``bad``.
    bad
        ``(n, ny, nx)`` bool, True where either image is bad.  A target pixel
        is fitted only if no bad pixel lies in its kernel footprint.
    kernel_size
        Odd kernel side ``k``.
    regularization
        ``"auto"`` (evidence maximisation) or a fixed dimensionless ``lam >= 0``
        used for every penalty term.
    penalty
        ``"compact"``, ``"laplacian"`` or ``"identity"`` (see the module docs).
    robust
        Exclude pixels with residuals beyond ``clip`` robust sigmas and refit.
    lam_init
        Starting ``lam`` of the search.  Every tile starts from it, so a
        tile's result does not depend on the other tiles of the batch.
    tol
        Convergence tolerance of the search, in ``log lam``.
    n_probes
        Random probes of the trace estimates used by the evidence updates.
    min_pixels_per_parameter
        Tiles with fewer valid pixels per unknown are flagged ``no_data``.
    chunk
        Tiles transformed together (bounds memory).
    """
    if not (isinstance(regularization, str) and regularization == "auto"):
        if isinstance(regularization, str) or not np.isfinite(regularization) or regularization < 0:
            raise OptionError(
                f"regularization must be 'auto' or a number >= 0, got {regularization!r}"
            )
    if clip <= 0:
        raise OptionError(f"clip must be positive (robust sigmas), got {clip!r}")
    n, ny, nx = sources.shape
    half = kernel_size // 2
    k2 = kernel_size * kernel_size
    penalty_grams, probes = _penalty_terms(kernel_size, penalty, n_probes)
    n_terms = len(penalty_grams)
    shape = fft_shape((ny, nx), half)
    box = _valid_box((ny, nx), half)
    footprint = np.ones((kernel_size, kernel_size), dtype=bool)
    lag = np.arange(kernel_size) - half
    auto_lam = isinstance(regularization, str)

    kernels = np.full((n, kernel_size, kernel_size), np.nan)
    background = np.full(n, np.nan)
    lam_out = np.full(n, np.nan)
    n_valid = np.zeros(n, dtype=np.int64)
    n_clipped = np.zeros(n, dtype=np.int64)
    flux_error = np.full(n, np.nan)
    gamma_out = np.full(n, np.nan)
    flag_out = np.zeros(n, dtype=fl.FLAG_DTYPE)
    lam_start = np.full(n_terms, float(lam_init))

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        src = np.asarray(sources[start:stop], dtype=np.float64)
        tgt = np.asarray(targets[start:stop], dtype=np.float64)
        if bad is None:
            excluded = np.zeros(src.shape, dtype=bool)
        else:
            tile_bad = np.asarray(bad[start:stop], dtype=bool)
            excluded = np.stack([binary_dilation(b, footprint) if b.any() else b for b in tile_bad])
        valid = box & ~excluded
        weights = valid.astype(np.float64)
        spec = sfft.rfft2(np.concatenate([src, tgt * weights, weights]), s=shape)
        fs, fr, fw = spec[:m], spec[m : 2 * m], spec[2 * m :]
        cross = sfft.irfft2(np.concatenate([np.conj(fs) * fr, np.conj(fs) * fw]), s=shape)
        cross = cross[:, (lag % shape[0])[:, None], (lag % shape[1])[None, :]].reshape(2 * m, k2)
        grams = valid_gram(src, half, spectra=fs)

        for i in range(m):
            t = start + i
            count = int(valid[i].sum())
            n_valid[t] = count
            if bad is not None and (excluded[i] & box).any():
                flag_out[t] |= fl.MASKED
            if count < min_pixels_per_parameter * (k2 + 1):
                flag_out[t] |= fl.NO_DATA
                continue
            gram = grams[i]
            drop = box & excluded[i]
            if drop.any():
                rows = design_rows(src[i], half, np.nonzero(drop))
                gram = gram - rows.T @ rows
            vals = tgt[i][valid[i]]
            tile = _Tile(gram, cross[m + i], cross[i], float(vals.sum()), float(vals @ vals),
                         count, penalty_grams, probes)
            src_vals = src[i][valid[i]]
            src_level = float(np.mean(src_vals**2)) + np.finfo(float).tiny
            if not np.all(np.isfinite(tile.scale)) or np.trace(tile.gc) <= 1e-12 * src_level * count * k2:
                flag_out[t] |= fl.NO_SIGNAL
                continue

            def fit(lam_start: np.ndarray):
                if auto_lam:
                    return _search_lam(tile, lam_start, tol=tol, max_iter=max_iter)
                lam_fixed = np.full(n_terms, float(regularization))
                return tile.solve(lam_fixed), lam_fixed, False

            sol, lam, at_bound = fit(lam_start)
            if sol is not None and robust:
                kern = sol.kernel
                model = _model(fs[i], kern, shape, (ny, nx), half)
                resid = tgt[i] - model - (tile.rsum - kern @ tile.colsum) / tile.count
                r = resid[valid[i]]
                centre = np.median(r)
                sigma = 1.4826 * np.median(np.abs(r - centre))
                outlier = np.zeros((ny, nx), dtype=bool)
                outlier[valid[i]] = np.abs(r - centre) > clip * sigma
                n_out = int(outlier.sum())
                if n_out and tile.count - n_out >= min_pixels_per_parameter * (k2 + 1):
                    pix = np.nonzero(outlier)
                    tile.remove(design_rows(src[i], half, pix), tgt[i][pix])
                    n_clipped[t] = n_out
                    n_valid[t] = tile.count
                    flag_out[t] |= fl.OUTLIERS_CLIPPED
                    if n_out > _RESEARCH_FRACTION * count:
                        sol, lam, at_bound = fit(lam)
                    else:  # a few pixels barely move the evidence optimum
                        sol = tile.solve(lam)
            if sol is None:
                flag_out[t] |= fl.NO_SIGNAL
                continue
            if at_bound:
                flag_out[t] |= fl.REGULARIZATION_AT_BOUND
            kern = sol.kernel
            kernels[t] = kern.reshape(kernel_size, kernel_size)
            background[t] = (tile.rsum - kern @ tile.colsum) / tile.count
            lam_out[t] = float(np.exp(np.mean(np.log(np.maximum(lam, _LAM_MIN)))))
            gamma_out[t] = sol.gamma
            dof = max(tile.count - 1 - sol.gamma, 1.0)
            ones, _ = lapack.dpotrs(sol.chol, np.ones(k2), lower=1)
            flux_error[t] = np.sqrt(sol.ed / dof * ones.sum())

    return LstsqResult(kernels, background, lam_out, n_valid, n_clipped, flux_error,
                       gamma_out, flag_out)


def _model(spectrum: np.ndarray, kernel: np.ndarray, shape, tile_shape, half: int) -> np.ndarray:
    """``kernel (*) source`` on the tile, from the padded source spectrum."""
    k = 2 * half + 1
    kern = kernel.reshape(k, k)
    fk = sfft.rfft2(kern, s=shape)
    full = sfft.irfft2(spectrum * fk, s=shape)
    return full[half : half + tile_shape[0], half : half + tile_shape[1]]
