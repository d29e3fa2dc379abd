"""Per-tile diagnostics of estimated kernels: noise, fit residual, signal, shape."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import binary_dilation

from .moments import adaptive_moments

__all__ = [
    "fit_region",
    "robust_noise",
    "model_images",
    "residual_statistics",
    "shape_statistics",
    "plain_centroids",
]


def fit_region(bad: np.ndarray, kernel_size: int) -> np.ndarray:
    """Target pixels whose whole kernel footprint is inside the tile and good."""
    n, ny, nx = bad.shape
    h = kernel_size // 2
    region = np.zeros(bad.shape, dtype=bool)
    region[:, h : ny - h, h : nx - h] = True
    footprint = np.ones((kernel_size, kernel_size), dtype=bool)
    for i in range(n):
        if bad[i].any():
            region[i] &= ~binary_dilation(bad[i], footprint)
    return region


def robust_noise(images: np.ndarray, bad: np.ndarray, *, max_samples: int = 20000) -> np.ndarray:
    """Per-tile Gaussian noise level from the MAD of horizontal pixel differences.

    Differences of neighbours cancel smooth structure; the median absolute
    deviation ignores stars and outliers.  At most ``max_samples`` evenly
    spread differences are used per tile.
    """
    n = len(images)
    diff = images[:, :, 1:] - images[:, :, :-1]
    ok = ~(bad[:, :, 1:] | bad[:, :, :-1])
    out = np.full(n, np.nan)
    step = max(1, diff[0].size // max_samples)
    for i in range(n):
        d = diff[i].ravel()[::step][ok[i].ravel()[::step]].astype(np.float64)
        if d.size:
            out[i] = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0)
    return out


def model_images(sources: np.ndarray, kernels: np.ndarray, *, chunk: int = 8) -> np.ndarray:
    """``fftconvolve(source, kernel, mode="same")`` for every tile (NaN kernels give NaN).

    Computed in the sources' precision (float32 stays float32), ``chunk``
    tiles per transform so the spectra stay small.
    """
    n, ny, nx = sources.shape
    k = kernels.shape[-1]
    h = k // 2
    shape = tuple(sfft.next_fast_len(s + k - 1, real=True) for s in (ny, nx))
    out = np.empty(sources.shape, dtype=sources.dtype)
    finite = np.all(np.isfinite(kernels), axis=(1, 2))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        fs = sfft.rfft2(sources[sl], s=shape)
        fk = sfft.rfft2(np.where(finite[sl, None, None], kernels[sl], 0.0).astype(sources.dtype), s=shape)
        out[sl] = sfft.irfft2(fs * fk, s=shape)[:, h : h + ny, h : h + nx]
    out[~finite] = np.nan
    return out


def residual_statistics(
    sources: np.ndarray,
    targets: np.ndarray,
    kernels: np.ndarray,
    background: np.ndarray,
    region: np.ndarray,
    noise: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Residual RMS and model signal RMS over the fit region, both in units of the noise."""
    model = model_images(sources, kernels)
    residual = np.full(len(sources), np.nan)
    signal = np.full(len(sources), np.nan)
    for i in range(len(sources)):
        sel = region[i]
        if not sel.any() or not np.isfinite(background[i]):
            continue
        m = model[i][sel].astype(np.float64)
        r = targets[i][sel] - m - background[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            residual[i] = np.sqrt(np.mean(r * r)) / noise[i]
            signal[i] = np.std(m) / noise[i]
    return residual, signal


def shape_statistics(kernels: np.ndarray):
    """Adaptive second moments of the kernels (see :func:`pipeline.moments.adaptive_moments`)."""
    return adaptive_moments(kernels)


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
