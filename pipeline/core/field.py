"""A smooth model of how the kernel varies across an image.

Every kernel pixel is a low-order 2-D polynomial in the tile position,
``K(y, x) = sum_t c_t P_i(u) P_j(v)`` with Legendre polynomials ``P`` of the
normalised coordinates ``u = (x - cx) / sx``, ``v = (y - cy) / sy`` (both in
[-1, 1] over the tile centres) and total degree ``i + j <= degree``.  The
coefficients come from one weighted least-squares fit over the usable tiles
(one right-hand side per kernel pixel).  The degree is chosen by exact
leave-one-out cross-validation (each tile predicted from a fit without it,
through the hat matrix), or fixed; tiles far from the model are rejected and
the fit repeated.  Pure NumPy.

The model is fitted to tiles inside an image and does not extrapolate: a field
that knows its image's ``extent`` (:func:`image_extent`; pixel centres at
integers, so an image of ``n`` rows spans ``[-0.5, n - 0.5]``) refuses
positions outside it (:class:`~pipeline.errors.OutsideImageError`), or with
``outside="nan"`` gives NaN kernels there and an
:class:`~pipeline.errors.OutsideImageWarning`.  Positions inside the image but
beyond the outermost tile centres (``|u|``, ``|v| > 1``) are covered pixels and
evaluated as anywhere else.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.polynomial import legendre

from ..errors import OptionError, OutsideImageError, OutsideImageWarning

__all__ = ["OUTSIDE", "STORED", "FieldFrame", "KernelField", "check_positions", "field_frame", "fit_kernel_field",
           "fit_tiles", "grid_outcome", "image_extent", "legendre_design", "outside_extent", "polynomial_terms",
           "resolvable_terms", "tile_weights"]

#: What :meth:`KernelField.kernel_at` does at positions outside the image: raise, or NaN kernels and a warning.
OUTSIDE = ("raise", "nan")


def image_extent(ny: int, nx: int) -> tuple[float, float, float, float]:
    """``(y_min, y_max, x_min, x_max)`` of an image of ``ny x nx`` pixels: ``[-0.5, n - 0.5]`` along each
    axis (pixel centres at integers, a half-pixel margin beyond the outermost ones)."""
    return (-0.5, float(ny) - 0.5, -0.5, float(nx) - 0.5)


def outside_extent(y: np.ndarray, x: np.ndarray, extent: tuple[float, float, float, float] | None) -> np.ndarray:
    """Bool, broadcast shape of ``y`` and ``x``: positions outside ``extent`` ``(y_min, y_max, x_min, x_max)``
    (none where ``extent`` is ``None``; NaN positions are not outside, they give NaN kernels)."""
    y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
    if extent is None:
        return np.zeros(y.shape, dtype=bool)
    y_min, y_max, x_min, x_max = extent
    return (y < y_min) | (y > y_max) | (x < x_min) | (x > x_max)


def check_positions(y: np.ndarray, x: np.ndarray, extent: tuple[float, float, float, float] | None,
                    outside: str = "raise", *, stacklevel: int = 2) -> np.ndarray:
    """Positions outside the image ``extent``, as :func:`outside_extent`; with ``outside="raise"`` any
    raises an :class:`~pipeline.errors.OutsideImageError`, with ``"nan"`` an
    :class:`~pipeline.errors.OutsideImageWarning` is given (at ``stacklevel``) and the mask returned."""
    if outside not in OUTSIDE:
        raise OptionError(f"outside={outside!r}: use one of {', '.join(map(repr, OUTSIDE))}")
    y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
    away = outside_extent(y, x, extent)
    if not away.any():
        return away
    y_min, y_max, x_min, x_max = extent
    first = np.flatnonzero(away.ravel())[0]
    where = f"(y={y.ravel()[first]:g}, x={x.ravel()[first]:g})"
    what = f"position {where} is" if away.size == 1 else \
        f"{int(away.sum())} of {away.size} positions, the first {where}, are"
    message = (f"{what} outside the image, which spans y {y_min:g} .. {y_max:g} and x {x_min:g} .. {x_max:g} "
               "(pixel centres at integers); the kernel-field model is fitted to tiles inside it and does not "
               "extrapolate")
    if outside == "raise":
        raise OutsideImageError(message + "; give positions inside it, or outside='nan' for NaN kernels there")
    warnings.warn(message + (": its kernel is NaN" if away.size == 1 else ": their kernels are NaN"),
                  OutsideImageWarning, stacklevel=stacklevel + 1)
    return away


def polynomial_terms(degree: int) -> list[tuple[int, int]]:
    """``(i, j)`` of the terms ``P_i(u) P_j(v)`` with ``i + j <= degree``, by total degree."""
    return [(total - j, j) for total in range(degree + 1) for j in range(total + 1)]


def legendre_design(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """``(n, n_terms)`` values of the terms ``P_i(u) P_j(v)`` (:func:`polynomial_terms` order)."""
    lu, lv = legendre.legvander(u, degree), legendre.legvander(v, degree)
    return np.stack([lu[:, i] * lv[:, j] for i, j in polynomial_terms(degree)], axis=1)


@dataclass(frozen=True)
class FieldFrame:
    """Normalised coordinates of a field: ``u = (x - cx) / sx``, ``v = (y - cy) / sy``."""

    centre: tuple[float, float]  #: ``(cy, cx)``
    scale: tuple[float, float]  #: ``(sy, sx)``

    def normalised(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(u, v)`` of positions ``(y, x)``."""
        return (x - self.centre[1]) / self.scale[1], (y - self.centre[0]) / self.scale[0]


def field_frame(y: np.ndarray, x: np.ndarray, usable: np.ndarray) -> FieldFrame:
    """The frame in which the ``usable`` tile centres span ``[-1, 1]`` (scale at least 1 px)."""
    y, x = np.asarray(y, dtype=np.float64)[usable], np.asarray(x, dtype=np.float64)[usable]
    return FieldFrame(centre=(float((y.max() + y.min()) / 2), float((x.max() + x.min()) / 2)),
                      scale=(float(max((y.max() - y.min()) / 2, 1.0)), float(max((x.max() - x.min()) / 2, 1.0))))


def resolvable_terms(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """``(n_terms,)`` bool: the terms ``P_i(u) P_j(v)`` that tiles at ``(u, v)`` can constrain.

    A term needs more than ``i`` distinct columns and ``j`` distinct rows of
    tiles: on a single row of tiles the model cannot (and does not) vary along y.
    """
    distinct_x = len(np.unique(np.round(u, 9)))
    distinct_y = len(np.unique(np.round(v, 9)))
    return np.array([i < distinct_x and j < distinct_y for i, j in polynomial_terms(degree)])



@dataclass(frozen=True)
class KernelField:
    """A fitted kernel field: evaluate it anywhere with :meth:`kernel_at`."""

    degree: int
    coefficients: np.ndarray  #: ``(n_terms, k, k)``, terms in :func:`polynomial_terms` order
    centre: tuple[float, float]  #: ``(cy, cx)`` of the normalised coordinates
    scale: tuple[float, float]  #: ``(sy, sx)``
    used: np.ndarray  #: ``(n,)`` bool: tiles in the final fit
    rejected: np.ndarray  #: ``(n,)`` bool: usable tiles rejected as far from the model
    cv_error: float  #: relative RMS error of leave-one-out predictions of the tiles used
    cv_errors: dict[int, float]  #: the same for every degree tried
    #: ``(y_min, y_max, x_min, x_max)`` of the image (:func:`image_extent`); ``None``: positions unchecked
    extent: tuple[float, float, float, float] | None = None

    def outside(self, y: np.ndarray | float, x: np.ndarray | float) -> np.ndarray:
        """Bool, broadcast shape of ``y`` and ``x``: positions outside :attr:`extent` (none without one)."""
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        return outside_extent(y, x, self.extent)

    def kernel_at(self, y: np.ndarray | float, x: np.ndarray | float, *, outside: str = "raise") -> np.ndarray:
        """Model kernels at positions ``(y, x)`` (input pixel coordinates): ``shape + (k, k)``.

        With an :attr:`extent`, positions outside the image raise an
        :class:`~pipeline.errors.OutsideImageError` (``outside="raise"``), or
        get NaN kernels with an :class:`~pipeline.errors.OutsideImageWarning`
        (``outside="nan"``).
        """
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        away = check_positions(y, x, self.extent, outside, stacklevel=2)
        u = (x.ravel() - self.centre[1]) / self.scale[1]
        v = (y.ravel() - self.centre[0]) / self.scale[0]
        k = self.coefficients.shape[-1]
        values = legendre_design(u, v, self.degree) @ self.coefficients.reshape(len(self.coefficients), -1)
        values[away.ravel()] = np.nan
        return values.reshape(*y.shape, k, k)

    def to_arrays(self) -> dict[str, Any]:
        """The model as the per-image values stored with a kernel map (names of :data:`STORED`)."""
        return {
            "model_degree": self.degree,
            "model_coefficient": self.coefficients,
            "model_cv_error": self.cv_error,
            "model_centre_y": self.centre[0],
            "model_centre_x": self.centre[1],
            "model_scale_y": self.scale[0],
            "model_scale_x": self.scale[1],
        }

    @classmethod
    def from_arrays(cls, values: Mapping[str, Any], *, used: np.ndarray, rejected: np.ndarray,
                    extent: tuple[float, float, float, float] | None = None) -> KernelField | None:
        """The model of one image from its stored values (:meth:`to_arrays`); ``None`` where its
        degree is negative (no model was fitted).  ``used``/``rejected`` come from the tiles' flags,
        ``extent`` from the image's shape (:func:`image_extent`)."""
        degree = int(values["model_degree"])
        if degree < 0:
            return None
        n_terms = len(polynomial_terms(degree))
        return cls(
            degree=degree,
            coefficients=np.asarray(values["model_coefficient"], dtype=np.float64)[:n_terms],
            centre=(float(values["model_centre_y"]), float(values["model_centre_x"])),
            scale=(float(values["model_scale_y"]), float(values["model_scale_x"])),
            used=np.asarray(used, dtype=bool).ravel(), rejected=np.asarray(rejected, dtype=bool).ravel(),
            cv_error=float(values["model_cv_error"]), cv_errors={},
            extent=None if extent is None else tuple(float(e) for e in extent),
        )


#: Names of the values :meth:`KernelField.to_arrays` gives (the store's ``model_*`` variables).
STORED = ("model_degree", "model_coefficient", "model_cv_error", "model_centre_y", "model_centre_x",
          "model_scale_y", "model_scale_x")


def _fit(a: np.ndarray, kernels: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares (minimum norm where the terms are not independent); returns the
    coefficients, residuals and leave-one-out residuals."""
    sw = np.sqrt(w)[:, None]
    q, sv, vt = np.linalg.svd(a * sw, full_matrices=False)
    keep = sv > sv[0] * 1e-10 if sv.size and sv[0] > 0 else np.zeros(sv.shape, bool)
    q, sv, vt = q[:, keep], sv[keep], vt[keep]
    coef = vt.T @ ((q.T @ (kernels * sw)) / sv[:, None])
    resid = kernels - a @ coef
    leverage = np.einsum("ij,ij->i", q, q)
    loo = resid / np.maximum(1.0 - leverage, 1e-12)[:, None]
    return coef, resid, loo


def _cv(loo: np.ndarray, kernels: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.sum(w * np.sum(loo**2, axis=1)) / np.sum(w * np.sum(kernels**2, axis=1))))


#: Tiles a bin of weight needs for :func:`_expected_squares` to measure a floor the weights do not predict.
FLOOR_BIN_TILES = 16


def _expected_squares(squares: np.ndarray, w: np.ndarray, bins: int = 4) -> np.ndarray:
    """Each tile's expected squared residual, ``a / w + b``: the part that shrinks as its weight grows (the
    noise the weights stand for) and a floor that does not (an estimator's own bias, the same in bright
    and faint tiles: Welch's kernels are as far from the truth at any signal-to-noise ratio).

    ``a`` and ``b`` (both >= 0) are fitted, relative to their size, to the median ``squares`` of the tiles
    in up to ``bins`` bins of equal count by weight (:data:`FLOOR_BIN_TILES` tiles a bin at least); with
    fewer than two bins, a single weight or a bin of exact fits, ``b = 0`` (the weights alone).
    """
    inv = 1.0 / w
    a, b = float(np.median(squares * w)), 0.0
    count = min(bins, len(squares) // FLOOR_BIN_TILES)
    if count >= 2 and np.ptp(inv) > 0:
        parts = np.array_split(np.argsort(inv, kind="stable"), count)
        x = np.array([np.median(inv[part]) for part in parts])
        y = np.array([np.median(squares[part]) for part in parts])
        if y.min() > 0:
            design = np.stack([x / y, 1.0 / y], axis=1)  # each bin relative to its size: a x / y + b / y ~ 1
            coef = np.linalg.lstsq(design, np.ones(count), rcond=None)[0]
            if coef.min() < 0:  # the best non-negative fit is then one term alone
                alone = [np.where(np.arange(2) == j, max(col.sum() / (col @ col), 0.0), 0.0)
                         for j, col in enumerate(design.T)]
                coef = min(alone, key=lambda c: float(np.sum((design @ c - 1.0) ** 2)))
            a, b = coef
    expected = a * inv + b
    return np.maximum(expected, np.finfo(float).tiny)


def fit_kernel_field(
    y: np.ndarray,
    x: np.ndarray,
    kernels: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    degree: int | None = None,
    max_degree: int = 3,
    clip: float = 4.0,
    max_iterations: int = 5,
) -> KernelField:
    """Fit a smooth polynomial kernel field to per-tile kernels.

    Parameters
    ----------
    y, x
        ``(n,)`` tile centres in input pixel coordinates.
    kernels
        ``(n, k, k)`` per-tile kernels; tiles with any NaN are not used.
    weights
        ``(n,)`` non-negative, e.g. inverse variances; 0 excludes a tile.  Default: equal.
    degree
        Total polynomial degree; ``None`` chooses it by leave-one-out
        cross-validation among ``0 .. max_degree`` (only degrees with at most
        half as many terms as usable tiles).
    clip
        Tiles whose residual norm, in units of its expected size
        (:func:`_expected_squares`: the part the weights predict and a floor
        they do not), exceeds the median by ``clip`` robust standard
        deviations are rejected and the model refitted (at most
        ``max_iterations`` times); ``inf`` keeps every tile.

    Returns
    -------
    KernelField
        With the coefficients, the tiles used and rejected, and the
        cross-validated error.  Raises ``ValueError`` without enough usable tiles.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    x = np.asarray(x, dtype=np.float64).ravel()
    kernels = np.asarray(kernels, dtype=np.float64)
    n, k = len(kernels), kernels.shape[-1]
    flat = kernels.reshape(n, -1)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).ravel().copy()
    usable = np.all(np.isfinite(flat), axis=1) & np.isfinite(w) & (w > 0)
    if usable.sum() < 1:
        raise ValueError("no usable tile to fit a kernel field to")
    frame = field_frame(y, x, usable)
    (cy, cx), (sy, sx) = frame.centre, frame.scale
    u, v = frame.normalised(y, x)

    def terms(d: int) -> np.ndarray:
        return resolvable_terms(u[usable], v[usable], d)

    if degree is not None and terms(degree).sum() > usable.sum():
        raise ValueError(f"degree {degree} has {int(terms(degree).sum())} terms but only "
                         f"{int(usable.sum())} usable tiles")

    def select(used: np.ndarray, degrees: list[int]):
        """Fit every candidate degree on the tiles ``used``; the best by leave-one-out error."""
        m = int(used.sum())
        errors, fits = {}, {}
        for d in degrees:
            mask = terms(d)
            coef, resid, loo = _fit(legendre_design(u[used], v[used], d)[:, mask], flat[used], w[used])
            full = np.zeros((len(mask), flat.shape[1]))
            full[mask] = coef
            fits[d] = (full, resid, loo)
            errors[d] = _cv(loo, flat[used], w[used]) if m > mask.sum() else np.nan
        best = min(degrees, key=lambda d: np.inf if np.isnan(errors[d]) else errors[d])
        return best, errors, fits

    def candidates(used: np.ndarray) -> list[int]:
        if degree is not None:
            return [degree]
        m = int(used.sum())
        return [d for d in range(max_degree + 1) if 2 * terms(d).sum() <= m] or [0]

    used = usable.copy()
    best, errors, fits = select(used, candidates(used))
    rejected_any = False
    for _ in range(max_iterations):  # reject outliers at the chosen degree, refit
        coef, resid, _loo = fits[best]
        m = int(used.sum())
        squares = np.sum(resid**2, axis=1)
        norms = np.sqrt(squares / _expected_squares(squares, w[used]))  # in units of each tile's expected error
        med = np.median(norms)
        spread = 1.4826 * np.median(np.abs(norms - med))
        negligible = 1e-6 * np.median(np.sqrt(w[used] * np.sum(flat[used] ** 2, axis=1)))  # round-off
        outliers = (norms > med + clip * spread) & (np.sqrt(w[used] * squares) > negligible) \
            if np.isfinite(clip) else np.zeros(m, bool)
        if not outliers.any() or m - outliers.sum() < 2 * terms(best).sum():
            break
        used[np.flatnonzero(used)[outliers]] = False
        rejected_any = True
        best, errors, fits = select(used, [best])
    if rejected_any and degree is None:  # the degree again, on the tiles finally kept
        best, errors, fits = select(used, candidates(used))
    coef = fits[best][0]
    return KernelField(
        degree=int(best), coefficients=coef.reshape(-1, k, k), centre=(float(cy), float(cx)),
        scale=(float(sy), float(sx)), used=used, rejected=usable & ~used,
        cv_error=float(errors[best]), cv_errors={int(d): float(e) for d, e in errors.items()},
    )


def tile_weights(snr: np.ndarray, flux: np.ndarray, cap: float = 10.0) -> np.ndarray:
    """Inverse-variance-like weights ``(snr / flux)^2`` (a kernel's error scales as flux / snr),
    capped at ``cap`` times their median so that no tile dominates; equal where unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (np.asarray(snr, dtype=np.float64) / np.asarray(flux, dtype=np.float64)) ** 2
    good = np.isfinite(w) & (w > 0)
    if not good.any():
        return np.ones(np.shape(w))
    w = np.where(good, w, np.median(w[good]))
    return np.minimum(w, cap * np.median(w))


def fit_tiles(
    y: np.ndarray,
    x: np.ndarray,
    kernels: np.ndarray,
    usable: np.ndarray,
    weights: np.ndarray,
    **options,
) -> tuple[KernelField | None, np.ndarray, np.ndarray]:
    """Fit the field to a grid of tiles: ``(field or None, residual, rejected)``.

    ``y``, ``x`` are the grid's tile centres (1-D), ``kernels`` ``(ny, nx, k, k)``;
    ``residual`` is each tile's relative L2 difference from the model (NaN
    where its kernel is), ``rejected`` the tiles left out as outliers.  No
    model (``None``) when too few tiles are usable.
    """
    k = kernels.shape[-1]
    yy, xx = np.meshgrid(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64), indexing="ij")
    flat = kernels.reshape(-1, k, k).astype(np.float64)
    w = np.where(np.asarray(usable).ravel(), np.asarray(weights, dtype=np.float64).ravel(), 0.0)
    try:
        field = fit_kernel_field(yy.ravel(), xx.ravel(), flat, weights=w, **options)
    except ValueError:
        field = None
    return grid_outcome(field, yy, xx, flat)


def grid_outcome(field: KernelField | None, yy: np.ndarray, xx: np.ndarray,
                 flat: np.ndarray) -> tuple[KernelField | None, np.ndarray, np.ndarray]:
    """``(field, residual, rejected)`` of a field fitted to a grid of tiles (``yy``, ``xx``: ``(ny, nx)``
    tile centres; ``flat``: their ``(ny*nx, k, k)`` kernels): each tile's relative L2 difference from
    the field and the tiles it left out as outliers (NaN and none without a field)."""
    if field is None:
        return None, np.full(yy.shape, np.nan), np.zeros(yy.shape, dtype=bool)
    model = field.kernel_at(yy.ravel(), xx.ravel())
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.sqrt(np.sum((flat - model) ** 2, axis=(1, 2)) / np.sum(model**2, axis=(1, 2)))
    return field, residual.reshape(yy.shape), field.rejected.reshape(yy.shape)
