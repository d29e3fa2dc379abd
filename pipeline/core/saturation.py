"""Saturated pixels: at or above an image's upper valid level, widened by a few pixels.

A detector stops counting at its saturation level, and the charge of a
saturated star bleeds into its neighbours, so a pixel whose value is at or
above the level is bad, and so is every pixel within ``grow`` pixels of one
(a square ``(2 * grow + 1)`` pixels on a side around it).  Pixels beyond the
image edge count as not saturated, so the bad area of a region is exact
wherever the region holds ``grow`` more pixels on each side than are kept
(see :func:`halo`).  NaN pixels are bad already; they are not saturated and
are not widened.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["saturated_pixels", "mask_saturated", "halo"]


def _levels(level: float | np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    """``level`` broadcast over the leading (image) axes of the images, as ``(..., 1, 1)``."""
    levels = np.asarray(level, dtype=np.float64)
    if levels.ndim > len(lead):
        raise ValueError(f"level has shape {levels.shape} but the images have only {lead} leading axes")
    try:
        return np.broadcast_to(levels, lead)[..., None, None]
    except ValueError:
        raise ValueError(f"level of shape {levels.shape} does not broadcast to the images' {lead}") from None


def saturated_pixels(image: np.ndarray, level: float | np.ndarray, grow: int = 1) -> np.ndarray:
    """Which pixels are saturated: at or above ``level``, or within ``grow`` pixels of one that is.

    Parameters
    ----------
    image
        ``(..., y, x)``: one image or a stack, any real dtype.
    level
        The upper valid level, in the units of ``image``: a number, or one
        per image of a stack (shape broadcastable to ``image.shape[:-2]``).
        A NaN level marks nothing.
    grow
        Radius in pixels by which each saturated pixel's bad area is widened:
        a square ``(2 * grow + 1)`` pixels on a side; 0 marks only the pixels
        at or above the level.

    Returns
    -------
    numpy.ndarray
        Bool, the shape of ``image``: True where saturated.  NaN pixels are
        not saturated (they are bad anyway) and do not widen.  Pixels beyond
        the edge of ``image`` count as not saturated.

    Raises
    ------
    ValueError
        ``image`` has fewer than two axes, ``grow`` is negative or not an
        integer, or ``level`` does not broadcast to the images.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"image must have at least two axes (y, x), got shape {image.shape}")
    if isinstance(grow, bool) or not isinstance(grow, (int, np.integer)) or grow < 0:
        raise ValueError(f"grow must be an integer >= 0, got {grow!r}")
    levels = _levels(level, image.shape[:-2])
    with np.errstate(invalid="ignore"):
        bad = image >= levels
    if grow == 0 or not bad.any():
        return bad
    size = (1,) * (image.ndim - 2) + (2 * int(grow) + 1,) * 2
    return ndimage.maximum_filter(bad, size=size, mode="constant", cval=False)


def mask_saturated(image: np.ndarray, level: float | np.ndarray, grow: int = 1) -> np.ndarray:
    """A float copy of ``image`` with its saturated pixels (see :func:`saturated_pixels`) set to NaN.

    Floating-point images keep their dtype, others become float64; ``image``
    itself is never written.  NaN pixels stay NaN.
    """
    image = np.asarray(image)
    dtype = image.dtype if image.dtype.kind == "f" else np.dtype(np.float64)
    out = np.array(image, dtype=dtype, copy=True)
    out[saturated_pixels(image, level, grow)] = np.nan
    return out


def halo(start: int, stop: int, grow: int, length: int) -> tuple[slice, slice]:
    """The region to read for an exact bad area of ``[start, stop)``, and where that lies in it.

    Returns ``(read, keep)``: ``read`` is ``[start, stop)`` widened by
    ``grow`` on each side and clipped to ``[0, length)``; ``keep`` selects
    ``[start, stop)`` inside what ``read`` reads.
    """
    lo, hi = max(start - grow, 0), min(stop + grow, length)
    return slice(lo, hi), slice(start - lo, stop - lo)
