"""An image resampled onto the reference's pixel grid (``ingest.reproject``), with its bad pixels and
variances.

The pixels are interpolated with ``reproject.reproject_interp`` at
``order="bicubic"`` (a cubic spline through the pixel values): of what
``reproject`` offers it is the one that keeps a star's profile closest, with
the least smoothing, and with no systematic sub-pixel shift; its smoothing
does not depend much on the fractional offset between the grids, whereas
bilinear interpolation blurs a pixel half-way between two grid points by a
[0.5, 0.5] kernel and one on a grid point not at all, which would show as a
kernel varying across a rotated image.  ``reproject_adaptive`` anti-aliases
with a kernel about a pixel wide, made for changes of pixel scale: between
images of one scale it only blurs more.  Flux conservation is not needed
between grids of (nearly) the same pixel scale; where the scales differ the
interpolated image keeps the surface brightness per pixel of its own grid
(the kernel's flux then includes the ratio of the pixel areas).

What resampling does to the data: interpolation is a convolution with the
interpolating kernel, so the kernel measured against the resampled target
includes it (for the cubic spline a slight smoothing, well under a pixel, and
a little ringing), and the noise of neighbouring resampled pixels is
correlated.  The variances are carried over by bilinear interpolation of the
input variances (never negative): at each output pixel the variance of the
input pixels it comes from.  The variance of one resampled pixel is smaller
(a weighted mean of correlated pixels) while the noise summed over a few
pixels is about that of the input: an approximation that keeps the relative
weights of pixels right, not their covariance.

Bad pixels spread: an output pixel is bad where any input pixel within the
interpolation's reach (the 4x4 neighbourhood of its position: bad pixels
grown by one, then any of the 2x2 nearest) is bad, and where the image does
not cover it (the footprint's zero coverage).  Before interpolating, bad
pixels take the median of the good ones, so that no NaN spreads through the
spline's prefilter and ringing stays small.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["resample_onto"]


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
        The resampled variances (bilinear), inf where bad.
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
    out, footprint = reproject_interp((filled, wcs), reference_wcs, shape_out=shape, order="bicubic",
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
        bad_out |= ~np.isfinite(var_out)
        var_out = np.where(bad_out, np.inf, np.maximum(var_out, 0.0)).astype(np.float32)
    return np.where(bad_out, np.nan, out).astype(np.float32), bad_out, var_out


def _median(values: np.ndarray, good: np.ndarray) -> float:
    return float(np.median(values[good])) if good.any() else 0.0
