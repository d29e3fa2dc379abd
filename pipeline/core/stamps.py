"""Transforms of kernel stamps on a larger grid, pruned to the stamp's rows.

A ``k x k`` stamp zero-padded to an ``(ny, nx)`` grid has ``k`` nonzero rows:
its ``rfft2`` needs the row transforms of those rows only, and where only the
stamp's ``k x k`` lags of an inverse transform are wanted, only ``k`` rows of
the column transform need transforming back.  The values are those of
``rfft2(stamps, s=shape)`` and ``irfft2(spectra, s=shape)[:, :k, :k]``
(rounding aside), for about a third less work on a grid twice the stamp's side.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

__all__ = ["stamp_lags", "stamp_spectra"]


def stamp_spectra(stamps: np.ndarray, shape: tuple[int, int], *, workers: int = 1) -> np.ndarray:
    """``rfft2`` of ``(n, k, k)`` stamps zero-padded to ``shape`` (the stamp in the grid's corner)."""
    return sfft.fft(sfft.rfft(stamps, n=shape[1], axis=-1, workers=workers), n=shape[0], axis=-2, workers=workers)


def stamp_lags(spectra: np.ndarray, shape: tuple[int, int], k: int, *, workers: int = 1) -> np.ndarray:
    """The first ``k x k`` values of ``irfft2(spectra, s=shape)``, ``(n, k, k)`` contiguous (``spectra`` is
    overwritten)."""
    rows = sfft.ifft(spectra, axis=-2, workers=workers, overwrite_x=True)[:, :k]
    return np.ascontiguousarray(sfft.irfft(rows, n=shape[1], axis=-1, workers=workers)[:, :, :k])
