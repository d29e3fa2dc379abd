"""The CCD noise model: per-pixel variances from an image, its gain and its read noise.

A CCD image in ADU whose pixel ``p`` counted ``gain * p`` electrons has the
Poisson variance ``p / gain`` (ADU²) plus the read noise, ``read_noise``
electrons RMS, that is ``(read_noise / gain)**2`` ADU²: the model of HOTPANTS
(``-tg``/``-tr``, ``-ig``/``-ir``) and SExtractor (``GAIN``).  The Poisson
term needs the sky that the pixels counted: an image whose sky was subtracted
gives its sky pixels almost no variance.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InputError, OptionError

__all__ = ["ccd_variance"]


def ccd_variance(image: ArrayLike, gain: ArrayLike, read_noise: ArrayLike = 0.0) -> np.ndarray:
    """Per-pixel variance of a CCD image: ``max(image, 0) / gain + (read_noise / gain)**2``.

    Parameters
    ----------
    image
        Real pixel values in ADU, not sky-subtracted (the Poisson term counts
        the sky's electrons); any shape.
    gain
        Electrons per ADU, finite and > 0: a number, or an array that
        broadcasts against ``image`` (e.g. ``gains[:, None, None]`` for a
        stack of images with one gain each).
    read_noise
        Read noise in electrons RMS, finite and >= 0 (a number or an array
        like ``gain``); 0 by default: only the Poisson term.

    Returns
    -------
    numpy.ndarray
        float64 variances in ADU², shaped like ``image`` (broadcast with
        ``gain`` and ``read_noise``); NaN where a pixel is not finite (a bad
        pixel stays bad).  Negative pixels (noise around a low sky) get the
        read-noise term alone.

    Raises
    ------
    InputError
        ``image`` is not real numbers.
    OptionError
        ``gain`` is not finite and > 0 or ``read_noise`` not finite and >= 0,
        anywhere; or they do not broadcast against ``image``.

    Examples
    --------
    >>> ccd_variance([[100.0, -3.0], [np.nan, 0.0]], gain=2.0, read_noise=4.0)
    array([[54.,  4.],
           [nan,  4.]])
    """
    pixels = np.asarray(image)
    if pixels.dtype.kind not in "iuf":
        raise InputError(f"image must hold real numbers, got dtype {pixels.dtype}")
    g = _checked("gain", gain, positive=True)
    rn = _checked("read_noise", read_noise, positive=False)
    values = pixels.astype(np.float64, copy=False)
    try:
        shape = np.broadcast_shapes(values.shape, g.shape, rn.shape)
    except ValueError:
        raise OptionError(f"gain {g.shape} and read_noise {rn.shape} must broadcast against the image "
                          f"{values.shape}: give numbers, or arrays of one value per image such as "
                          "gains[:, None, None]") from None
    with np.errstate(invalid="ignore"):
        variance = np.maximum(values, 0.0) / g + (rn / g) ** 2
    return np.where(np.isfinite(values), variance, np.nan).reshape(shape)


def _checked(name: str, value: ArrayLike, *, positive: bool) -> np.ndarray:
    """``value`` as float64 after checking every element is finite and > 0 (``positive``) or >= 0."""
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number or an array of numbers, got {value!r}") from None
    rule, unit = ("> 0", "electrons per ADU") if positive else (">= 0", "electrons RMS")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | ((values <= 0) if positive else (values < 0))
    if bad.any():
        shown = value if values.ndim == 0 else f"{int(bad.sum())} bad value(s), e.g. {float(values[bad].flat[0])!r}"
        raise OptionError(f"{name} must be finite and {rule} ({unit}), got {shown}")
    return values
