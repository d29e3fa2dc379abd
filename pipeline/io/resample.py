"""An image resampled onto the reference's pixel grid (``ingest.reproject``), with its bad pixels and
variances.

The pixels are interpolated with ``reproject.reproject_interp`` at
``order="bicubic"``: ``scipy.ndimage.map_coordinates`` with ``order=3``
(a cubic spline through the pixel values, with the spline prefilter) and
``mode="constant"``, at the input pixel coordinates of each output pixel
(``pixel_to_pixel`` of the two WCS).  Of what ``reproject`` offers it keeps a
star's profile closest, with no systematic sub-pixel shift.  Its smoothing
does depend on the fractional offset ``t`` between the grids (per axis): at
``t = 0`` the spline returns the input pixel itself, at ``t = 0.5`` it
damps the highest frequencies most (at the Nyquist frequency fully).  White
noise shows it: the sum of the squared interpolation weights, the factor
by which an interpolated pixel's variance falls, is 1 at ``t = 0``, 0.973
at 0.1, 0.871 at 0.25 and 0.756 at 0.5 per axis; a pixel offset by (0.25,
0.25) keeps 0.758 of the noise variance, one offset by (0.5, 0.5) 0.572
(bilinear interpolation: 0.25 there).  Across a rotated image the offset,
and so this smoothing, varies from pixel to pixel: the kernel measured
against the resampled target includes the interpolation kernel of each
place.  ``reproject_adaptive`` anti-aliases with a kernel about a pixel wide,
made for changes of pixel scale: between images of one scale it only blurs
more.  Flux conservation is not needed between grids of (nearly) the same
pixel scale; where the scales differ the interpolated image keeps the surface
brightness per pixel of its own grid (the kernel's flux then includes the
ratio of the pixel areas).

Variances: an interpolated pixel ``sum_i w_i x_i`` has the variance
``sum_i w_i**2 var_i``.  The input variances are interpolated bilinearly
(never negative: the variance of the input pixels around the position) and
multiplied by the factor ``sum_i w_i**2`` of the bicubic spline at that
position (:func:`resampling_noise_factor`, exact for a uniform variance: it
is separable, ``g(py) * g(px)``; in the interior ``g`` depends only on the
fractional offset, :func:`spline_noise_factor`; within ``EDGE`` pixels of
the input's edges the spline's boundary and reproject's taking of positions
within half a pixel beyond the edge onto it change the weights, which
:func:`axis_noise_factor` follows: by up to 40 % at the edge).  The noise of neighbouring resampled pixels is
correlated (they share input pixels); the stored per-pixel variance does not
describe that covariance, so the noise summed over several pixels is larger
than the sum of their variances says.

Bad pixels spread: an output pixel is bad where any input pixel within the
interpolation's reach (the 4x4 neighbourhood of its position: bad pixels
grown by one, then any of the 2x2 nearest) is bad, and where the image does
not cover it (the footprint's zero coverage).  Before interpolating, bad
pixels take the median of the good ones, so that no NaN spreads through the
spline's prefilter and ringing stays small.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["axis_noise_factor", "resample_onto", "resampling_noise_factor", "spline_noise_factor"]

#: The interpolation order of ``reproject_interp`` (``"bicubic"``: a cubic spline) and its scipy order.
ORDER, SPLINE_ORDER = "bicubic", 3


@lru_cache(maxsize=4)
def _noise_table(order: int, n: int = 1025) -> tuple[np.ndarray, np.ndarray]:
    """``(t, f(t))`` on ``n`` points of ``[0, 1]``: the sum of the squared 1-D interpolation weights of
    ``scipy.ndimage.map_coordinates`` at order ``order`` (spline prefilter on) at fractional offset ``t``,
    from the interpolated unit impulse (the cardinal spline, which decays by ~0.27 a pixel: 30 pixels
    each side leave out less than 1e-16)."""
    from scipy.ndimage import map_coordinates

    half = 30
    impulse = np.zeros(4 * half + 1)
    centre = 2 * half
    impulse[centre] = 1.0
    t = np.linspace(0.0, 1.0, n)
    j = np.arange(-half, half + 1)
    where = (centre + t[:, None] + j[None, :]).ravel()
    weights = map_coordinates(impulse, where[None, :], order=order, mode="constant", cval=0.0).reshape(n, -1)
    return t, (weights**2).sum(axis=1)


def spline_noise_factor(t: np.ndarray, order: int = SPLINE_ORDER) -> np.ndarray:
    """The sum of the squared 1-D weights of the spline interpolation of ``order`` at positions whose
    fractional part is ``t`` (any real numbers; only ``t mod 1`` counts): 1 at whole pixels, at order 3
    0.756 half-way.  The factor of a 2-D position ``(y, x)`` is ``f(y) * f(x)``."""
    grid, table = _noise_table(order)
    t = np.asarray(t, dtype=np.float64)
    return np.interp(t - np.floor(t), grid, table)


#: Input pixels from either edge within which the spline's boundary changes the interpolation weights (beyond
#: it their squares sum as in the interior's table to better than 1e-8: the cubic spline's reach falls by
#: 0.268 a pixel), and the line on which the edges' weights are found (its far end out of their reach).
EDGE, _LINE = 12, 64


@lru_cache(maxsize=8)
def _edge_table(order: int, n: int, per_pixel: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(p, g(p))`` on a fine grid of ``[0, min(EDGE + 1, n - 1)]``: the sum of the squared 1-D weights of
    ``scipy.ndimage.map_coordinates`` at ``order`` (``mode="constant"``, as reproject calls it) at position
    ``p`` of a line of ``n`` pixels (at most ``_LINE``: a longer line's first pixels weigh the same), from
    the interpolated unit impulse of each of its pixels."""
    from scipy.ndimage import map_coordinates

    top = min(EDGE + 1.0, n - 1.0)
    positions = np.linspace(0.0, top, int(top * per_pixel) + 1)
    weights = np.empty((n, len(positions)))
    for k in range(n):
        impulse = np.zeros(n)
        impulse[k] = 1.0
        weights[k] = map_coordinates(impulse, positions[None, :], order=order, mode="constant", cval=0.0)
    return positions, (weights**2).sum(axis=0)


def axis_noise_factor(p: np.ndarray, n: int, order: int = SPLINE_ORDER) -> np.ndarray:
    """The sum of the squared 1-D weights of reproject's spline interpolation of ``order`` at positions ``p``
    (zero-based) of a line of ``n`` input pixels, edges included: positions within half a pixel beyond the
    first or last pixel taken onto it, as reproject does; NaN beyond (not covered).  The factor of a 2-D
    position is the product of its two axes' (the spline and its prefilter are separable)."""
    p = np.array(p, dtype=np.float64)
    p[(p < 0) & (p >= -0.5)] = 0.0
    p[(p >= n - 1) & (p < n - 0.5)] = n - 1.0
    out = spline_noise_factor(p, order)
    if n <= 1:
        out[:] = 1.0
    else:  # within reach of an edge: the edge's table (the far edge's weights are the near one's, reflected)
        grid, table = _edge_table(order, min(n, _LINE))
        near, far = p <= grid[-1], (n - 1) - p <= grid[-1]
        out[far] = np.interp((n - 1) - p[far], grid, table)
        out[near] = np.interp(p[near], grid, table)
    out[~((p >= -0.5) & (p <= n - 0.5))] = np.nan
    return out


def resample_onto(data: np.ndarray, bad: np.ndarray | None, variance: np.ndarray | None, wcs: Any,
                  reference_wcs: Any, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``data`` (pixels of the grid of ``wcs``) resampled onto the grid of ``reference_wcs`` of ``shape``.

    Parameters
    ----------
    data
        The image; NaN or inf marks a bad pixel.
    bad
        True where the image's mask says a pixel is bad (``None``: none).
    variance
        Its per-pixel variances (NaN or inf: a bad pixel), or ``None``.
    wcs, reference_wcs
        Celestial WCS (``astropy.wcs.WCS``) of the image and of the reference.
    shape
        ``(ny, nx)`` of the reference.

    Returns
    -------
    data : float32 ndarray
        The resampled image, NaN where bad.
    bad : bool ndarray
        Where the output is bad: touched by a bad input pixel, or not covered.
    variance : float32 ndarray or None
        The variances of the resampled pixels (the input's interpolated bilinearly, times the bicubic
        spline's sum of squared weights there), inf where bad.
    """
    from reproject import reproject_interp
    from scipy.ndimage import binary_dilation

    data = np.asarray(data, dtype=np.float64)
    invalid = ~np.isfinite(data)
    if bad is not None:
        invalid |= np.asarray(bad, dtype=bool)
    if variance is not None:
        invalid |= ~np.isfinite(variance)
    filled = np.where(invalid, _median(data, ~invalid), data)
    out, footprint = reproject_interp((filled, wcs), reference_wcs, shape_out=shape, order=ORDER,
                                      return_footprint=True)
    reach = binary_dilation(invalid, structure=np.ones((3, 3), bool)) if invalid.any() else invalid
    touched = reproject_interp((reach.astype(np.float64), wcs), reference_wcs, shape_out=shape,
                               order="bilinear", return_footprint=False)
    with np.errstate(invalid="ignore"):
        bad_out = (footprint <= 0) | ~np.isfinite(out) | ~(touched <= 0)
    var_out = None
    if variance is not None:
        variance = np.asarray(variance, dtype=np.float64)
        var_filled = np.where(invalid, _median(variance, ~invalid), variance)
        var_out = reproject_interp((var_filled, wcs), reference_wcs, shape_out=shape, order="bilinear",
                                   return_footprint=False)
        with np.errstate(invalid="ignore"):
            var_out = np.maximum(var_out, 0.0) * resampling_noise_factor(wcs, reference_wcs, shape, data.shape)
        bad_out |= ~np.isfinite(var_out)
        var_out = np.where(bad_out, np.inf, var_out).astype(np.float32)
    return np.where(bad_out, np.nan, out).astype(np.float32), bad_out, var_out


def resampling_noise_factor(wcs: Any, reference_wcs: Any, shape: tuple[int, int],
                            shape_in: tuple[int, int]) -> np.ndarray:
    """At each pixel of the reference's grid of ``shape``: the sum of the squared weights of the bicubic
    interpolation there, ``g_y(py) * g_x(px)`` (:func:`axis_noise_factor`) of its position in the pixels of
    ``wcs``'s image of ``shape_in``, edges included."""
    from astropy.wcs.utils import pixel_to_pixel

    yy, xx = np.mgrid[0: shape[0], 0: shape[1]].astype(np.float64)
    with np.errstate(invalid="ignore"):
        px, py = pixel_to_pixel(reference_wcs, wcs, xx, yy)
    px, py = np.asarray(px, dtype=np.float64), np.asarray(py, dtype=np.float64)
    return axis_noise_factor(py, shape_in[0]) * axis_noise_factor(px, shape_in[1])  # NaN where not covered


def _median(values: np.ndarray, good: np.ndarray) -> float:
    return float(np.median(values[good])) if good.any() else 0.0
