"""Filling isolated bad source pixels from their neighbours.

A bad *source* pixel spoils every target pixel whose kernel footprint covers
it: excluding them all throws away ``k^2`` equations per bad pixel, most of
them on the bright stars that carry the kernel signal.  A source pixel whose
neighbourhood is mostly good is instead replaced by a least-squares
polynomial through its good neighbours (degree 4 over the 7x7 box by
default), and every target pixel stays in the fit.  The fill error is below
the source noise except at the peaks of bright stars, and it changes the
kernel less than the excluded equations would.

The fill weights depend only on which neighbours are good, so the bad pixels
are grouped by that pattern and each pattern is solved once (most scattered
bad pixels share the pattern "only the centre is bad"; a bad column shares
"the centre column is bad").  Pixels whose neighbourhood is too empty for a
credible fill (clusters, saturated cores, the centre of a blob) are returned
as *unfillable*: the caller excludes the target pixels they reach.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["FILL_RADIUS", "fill_bad_pixels"]

#: Half-side of the neighbourhood a fill is fitted to (7x7).
FILL_RADIUS = 3
#: Degree of the fitted polynomial (15 coefficients in two dimensions).
_DEGREE = 4
#: A pixel is filled only if this many of its 8 closest neighbours are good ...
_MIN_CLOSE = 5
#: ... and this many of the whole neighbourhood (48 for 7x7).
_MIN_GOOD = 30


@lru_cache(maxsize=1)
def _monomials() -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the neighbourhood and their monomials ``dy^i dx^j``, ``i + j <= degree``."""
    r = FILL_RADIUS
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    dy, dx = dy.ravel() / r, dx.ravel() / r  # scaled to [-1, 1]: a well-conditioned fit
    powers = [(i, j) for i in range(_DEGREE + 1) for j in range(_DEGREE + 1 - i)]
    design = np.stack([dy**i * dx**j for i, j in powers], axis=1)
    return design, np.array([1.0 if (i, j) == (0, 0) else 0.0 for i, j in powers])


@lru_cache(maxsize=4096)
def _weights(pattern: bytes) -> np.ndarray:
    """Weights over the neighbourhood's pixels giving the fitted polynomial's centre value.

    ``pattern`` is the packed ``(2r+1)^2`` boolean pattern of usable
    neighbours; the polynomial's value at the centre is
    ``e0^T (V^T V)^-1 V^T y``, so the weights are ``V (V^T V)^-1 e0``.
    """
    design, e0 = _monomials()
    good = np.unpackbits(np.frombuffer(pattern, dtype=np.uint8))[: len(design)].astype(bool)
    v = design[good]
    coef = np.linalg.lstsq(v.T @ v, e0, rcond=1e-12)[0]  # the normal equations are 15x15
    w = np.zeros(len(good))
    w[good] = v @ coef
    return w


def fill_bad_pixels(image: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill isolated bad pixels of one image from their good neighbours.

    Parameters
    ----------
    image
        ``(ny, nx)`` image; values at bad pixels are ignored (may be NaN).
    bad
        ``(ny, nx)`` bool, True where the pixel is bad.

    Returns
    -------
    filled : numpy.ndarray
        A float64 copy with every fillable bad pixel replaced and the
        unfillable ones set to zero.
    unfillable : numpy.ndarray
        ``(ny, nx)`` bool: bad pixels left unfilled (fewer than 5 of their 8
        closest or 30 of their 48 neighbours in the 7x7 box good, counting
        pixels beyond the image edge as missing).
    """
    bad = np.asarray(bad, dtype=bool)
    filled = np.where(bad, 0.0, np.asarray(image, dtype=np.float64))
    unfillable = np.zeros(bad.shape, dtype=bool)
    ys, xs = np.nonzero(bad)
    if not len(ys):
        return filled, unfillable
    r = FILL_RADIUS
    side = 2 * r + 1
    padded_bad = np.pad(bad, r, constant_values=True)
    padded = np.pad(filled, r)
    offy, offx = np.mgrid[0:side, 0:side]
    # neighbourhood patterns of every bad pixel, as rows of booleans
    good = ~padded_bad[ys[:, None] + offy.ravel()[None, :], xs[:, None] + offx.ravel()[None, :]]
    close = good.reshape(-1, side, side)[:, r - 1 : r + 2, r - 1 : r + 2].sum(axis=(1, 2))
    usable = (close >= _MIN_CLOSE) & (good.sum(axis=1) >= _MIN_GOOD)
    unfillable[ys[~usable], xs[~usable]] = True
    ys, xs, good = ys[usable], xs[usable], good[usable]
    if not len(ys):
        return filled, unfillable
    packed = np.packbits(good, axis=1)
    patterns, first, which = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    values = padded[ys[:, None] + offy.ravel()[None, :], xs[:, None] + offx.ravel()[None, :]]
    fill = np.empty(len(ys))
    for p in range(len(patterns)):
        sel = which.ravel() == p
        w = _weights(packed[first[p]].tobytes())
        fill[sel] = values[sel] @ w
    filled[ys, xs] = fill
    return filled, unfillable
