"""Per-tile diagnostics of estimated kernels: noise, fit residual, signal, centroid."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from .stamps import stamp_spectra

__all__ = [
    "interior_models",
    "model_images",
    "residual_statistics",
    "plain_centroids",
]


def model_images(sources: np.ndarray, kernels: np.ndarray, *, chunk: int = 8) -> np.ndarray:
    """``fftconvolve(source, kernel, mode="same")`` for every tile (NaN kernels give NaN).

    Computed in the sources' precision (float32 stays float32), ``chunk``
    tiles per transform so the spectra stay small.
    """
    ny, nx = sources.shape[1:]
    k = kernels.shape[-1]
    shape = tuple(sfft.next_fast_len(s + k - 1, real=True) for s in (ny, nx))
    return _convolved(sources, kernels, shape, k // 2, (ny, nx), chunk)


def interior_models(sources: np.ndarray, kernels: np.ndarray, *, chunk: int = 8) -> np.ndarray:
    """:func:`model_images` on the tiles' interior alone, ``(n, ny - 2h, nx - 2h)`` (``h = k // 2``).

    There every footprint lies inside the tile, so a circular convolution on
    the tile's own grid gives the same values (rounding aside) as the padded
    one, for a cheaper transform (256 against 280 points a side, 256-px
    tiles, k = 21).
    """
    ny, nx = sources.shape[1:]
    h = kernels.shape[-1] // 2
    # the kernel's centre at (h, h) delays the convolution by h: interior pixel y sits at y + h
    return _convolved(sources, kernels, (ny, nx), 2 * h, (ny - 2 * h, nx - 2 * h), chunk)


def _convolved(sources: np.ndarray, kernels: np.ndarray, shape: tuple[int, int], first: int,
               size: tuple[int, int], chunk: int) -> np.ndarray:
    """The ``size`` pixels from ``(first, first)`` on of each tile's convolution with its kernel (the
    kernel in the corner) on a ``shape`` grid, ``chunk`` tiles per transform; NaN for NaN kernels."""
    n = len(sources)
    out = np.empty((n, *size), dtype=sources.dtype)
    finite = np.all(np.isfinite(kernels), axis=(1, 2))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        fs = sfft.rfft2(sources[sl], s=shape)
        stamps = np.where(finite[sl, None, None], kernels[sl], 0.0).astype(sources.dtype)
        fk = stamp_spectra(stamps, shape)
        out[sl] = sfft.irfft2(fs * fk, s=shape)[:, first : first + size[0], first : first + size[1]]
    out[~finite] = np.nan
    return out


def residual_statistics(
    sources: np.ndarray,
    targets: np.ndarray,
    kernels: np.ndarray,
    background: np.ndarray,
    region: np.ndarray,
    *,
    max_samples: int = 8192,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise, residual and signal of each fit over its fit region.

    ``noise`` is the robust (MAD) standard deviation of the residual
    ``target - kernel * source - background``, from at most ``max_samples``
    evenly spread pixels; ``residual`` is the residual's RMS over that (about
    1 for Gaussian residuals, large with outliers or a kernel that does not
    fit); ``signal`` is the RMS of the model ``kernel * source`` over the noise.
    """
    n, ny, nx = sources.shape
    h = kernels.shape[-1] // 2
    border = region.copy()
    border[:, h : ny - h, h : nx - h] = False
    if border.any():
        model = model_images(sources, kernels)
    else:  # the fit region keeps off the edges (as fit_region's does): the interior suffices
        model, region, targets = (interior_models(sources, kernels), region[:, h : ny - h, h : nx - h],
                                  targets[:, h : ny - h, h : nx - h])
    noise = np.full(n, np.nan)
    residual = np.full(n, np.nan)
    signal = np.full(n, np.nan)
    fitted = region.any(axis=(1, 2)) & np.isfinite(background)
    whole = region.all(axis=(1, 2))
    for i in np.flatnonzero(fitted):
        # a tile fitted over its whole region (as cut above) needs no boolean copy
        m = (model[i] if whole[i] else model[i][region[i]]).astype(np.float64).ravel()
        r = (targets[i] if whole[i] else targets[i][region[i]]).ravel() - m - background[i]
        sample = r[:: max(1, r.size // max_samples)]
        noise[i] = 1.4826 * np.median(np.abs(sample - np.median(sample)))
        with np.errstate(divide="ignore", invalid="ignore"):
            residual[i] = np.sqrt(np.mean(r * r)) / noise[i]
            signal[i] = np.std(m) / noise[i]
    return noise, residual, signal


def plain_centroids(kernels: np.ndarray, moments) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive centroids, falling back to the plain first moment where moments failed.

    Offsets are in pixels from the kernel centre ``(k//2, k//2)``.
    """
    k = kernels.shape[-1]
    offsets = np.arange(k) - k // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        total = kernels.sum(axis=(1, 2))
        plain_y = (kernels.sum(axis=2) @ offsets) / total
        plain_x = (kernels.sum(axis=1) @ offsets) / total
    use_plain = ~np.asarray(moments.converged)
    y = np.where(use_plain, plain_y, moments.y)
    x = np.where(use_plain, plain_x, moments.x)
    return y, x
