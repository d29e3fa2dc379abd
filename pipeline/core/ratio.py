"""The textbook kernel estimate: ``FFT(target) / FFT(source)`` over a whole tile.

This is the baseline the other estimators are compared with. The discrete
Fourier transform treats each tile as periodic, so on real (non-periodic)
images the jumps between opposite edges put a cross-shaped artifact along the
kernel's central row and column, and frequencies where the source has little
power amplify the noise. Both are left as they are on purpose. On a target
that is an exact circular convolution of its source the estimate is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from ..errors import InputError, OptionError
from .options import RatioOptions
from .validate import check_odd_size, check_positive_int, either_bad

__all__ = ["RatioResult", "ratio_kernels"]


@dataclass(frozen=True)
class RatioResult:
    """Kernels estimated by :func:`ratio_kernels`.

    Attributes
    ----------
    kernels : numpy.ndarray
        ``(n, k, k)`` float64 kernels, centre at ``(k // 2, k // 2)``; NaN for
        tiles without any good pixel.
    background : numpy.ndarray
        ``(n,)`` float64 ``mean(target) - sum(kernel) * mean(source)`` over the
        good pixels; NaN where the kernel is NaN.
    """

    kernels: np.ndarray
    background: np.ndarray


def ratio_kernels(
    sources: np.ndarray,
    targets: np.ndarray,
    bad: np.ndarray | None = None,
    *,
    kernel_size: int,
    options: RatioOptions | None = None,
    source_bad: np.ndarray | None = None,
    target_bad: np.ndarray | None = None,
    workers: int = 1,
    **option_keywords: Any,
) -> RatioResult:
    """Estimate one kernel per tile as the ratio of the tiles' transforms.

    Each tile has its mean (over good pixels) removed and its bad pixels set to
    that mean; the kernel transform is ``FFT(target) / FFT(source)``, zero where
    ``FFT(source)`` is exactly zero. Removing the means leaves the zero
    frequency undetermined (which is what makes the kernel independent of a
    constant offset); it is fixed by requiring the full-tile inverse transform
    to average zero outside the central ``k x k`` support.

    Parameters
    ----------
    sources, targets : numpy.ndarray
        ``(n, ty, tx)`` finite real tiles.
    bad : numpy.ndarray, optional
        ``(n, ty, tx)`` bool, True marks a bad pixel.
    source_bad, target_bad : numpy.ndarray, optional
        Pixels bad in one image only; treated like ``bad``.
    kernel_size : int
        Odd kernel side, at most the tile's smaller side.
    options : RatioOptions, optional
        The method has no options; accepted for a uniform call.
    workers : int
        Threads used by :mod:`scipy.fft`.

    Returns
    -------
    RatioResult
        Kernels and background offsets.
    """
    RatioOptions.resolve(options, option_keywords)
    bad = either_bad(bad, source_bad, target_bad)
    k = check_odd_size("kernel_size", kernel_size)
    workers = check_positive_int("workers", workers)
    sources = np.asarray(sources)
    targets = np.asarray(targets)
    if sources.ndim != 3 or sources.shape != targets.shape:
        raise InputError(
            f"sources and targets must be (n, ty, tx) of one shape, got {sources.shape} and {targets.shape}"
        )
    _, ty, tx = sources.shape
    if k > min(ty, tx):
        raise OptionError(f"kernel_size {k} exceeds the tile size {(ty, tx)}")
    good = np.ones(sources.shape, dtype=bool) if bad is None else ~np.asarray(bad, dtype=bool)
    if good.shape != sources.shape:
        raise InputError(f"bad must have shape {sources.shape}, got {good.shape}")

    count = good.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_s = np.where(good, sources, 0).sum(axis=(1, 2), dtype=np.float64) / count
        mean_r = np.where(good, targets, 0).sum(axis=(1, 2), dtype=np.float64) / count
    src = np.where(good, sources - mean_s[:, None, None], 0.0)
    tgt = np.where(good, targets - mean_r[:, None, None], 0.0)

    fs = sfft.rfft2(src, workers=workers)
    fr = sfft.rfft2(tgt, workers=workers)
    fr[:, 0, 0] = 0.0
    ratio = np.divide(fr, fs, out=np.zeros_like(fr), where=fs != 0)
    full = sfft.irfft2(ratio, s=(ty, tx), workers=workers, overwrite_x=True)
    iy = (np.arange(k) - k // 2) % ty
    ix = (np.arange(k) - k // 2) % tx
    kernels = full[:, iy][:, :, ix]
    outside = ty * tx - k * k
    if outside > 0:
        # The zero-DC inverse sums to zero, so its outside mean is -inside sum / outside.
        kernels += (kernels.sum(axis=(1, 2)) / outside)[:, None, None]

    background = mean_r - kernels.sum(axis=(1, 2)) * mean_s
    none = count == 0
    kernels[none] = np.nan
    background[none] = np.nan
    return RatioResult(kernels=kernels, background=background)
