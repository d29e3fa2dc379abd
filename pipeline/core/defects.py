"""Defects nobody marked, found in the pixels: saturated cores and single-pixel spikes.

Both are sharper than any image of the sky can be.  A saturated star's core
is flat at the detector's limit (:func:`saturation_plateau`); a hot or dead
pixel stands alone above or below neighbours that a point spread function
would have lit too (:func:`spikes`).  In the *source* either spoils every
target pixel whose kernel footprint covers it, so the exact solver's robust
pass looks for them before fitting, and treats them as bad source pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["saturation_plateau", "spikes"]

#: Pixels at a tile's maximum value that make a saturation plateau.
_PLATEAU = 3
#: A spike stands out of its 3x3 median by this many robust sigmas ...
_SPIKE_SIGMAS = 10.0
#: ... and its 3x3 median holds less than this fraction of its height (a star's keeps about half).
_SPIKE_SHARPNESS = 0.25
#: With the other image given: a candidate whose 3x3 box there departs from the sky by this many
#: sigmas is a source of light seen in both images (an undersampled star), not a defect.
_COUNTERPART_SIGMAS = 5.0
#: ... and by this fraction of the candidate's own height (a star keeps a fifth or more of its peak
#: through a kernel of twice its width; a hot pixel on faint light elsewhere does not).
_COUNTERPART_FRACTION = 0.02
#: More spikes than this fraction of the pixels: the image is not of that kind (a photo); none are reported.
_SPIKE_FRACTION = 0.005


def saturation_plateau(image: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Pixels of a saturation plateau: the image's maximum, shared by several touching pixels.

    A saturated star's core is flat at the detector's limit, so its pixels
    hold one identical value, the largest of the tile.  Three or more
    pixels at the maximum (within 1e-6 of it, relatively), at least two of
    them side by side, are taken as saturated; otherwise nothing is (nor
    when they are more than a quarter of the image: a flat image).  Only
    the tile's highest plateau is found, and only where saturated pixels
    still share one value (raw or bias-subtracted frames); after division by
    a flat field they do not: give the level (``input.saturation``).
    Returns a boolean map (all False for an image without a plateau).
    """
    values = np.where(usable, image, -np.inf)
    top = float(values.max())
    if not np.isfinite(top):
        return np.zeros(image.shape, dtype=bool)
    plateau = values >= top - 1e-6 * abs(top)
    count = int(plateau.sum())
    if count < _PLATEAU or count > 0.25 * usable.sum() or not (
        (plateau[1:] & plateau[:-1]).any() or (plateau[:, 1:] & plateau[:, :-1]).any()
    ):
        return np.zeros(image.shape, dtype=bool)
    return plateau


def _sky(image: np.ndarray, usable: np.ndarray) -> tuple[float, float, np.ndarray] | None:
    """Median level, robust pixel noise (from neighbour differences) and the image with unusable
    pixels at that level; ``None`` when nothing can be measured."""
    rows = slice(None, None, max(1, image.shape[0] // 16))  # statistics from about 16 rows
    everywhere = bool(usable.all())
    if not usable[rows].any():  # those rows all bad: every row
        rows = slice(None)
    level = float(np.median(image[rows] if everywhere else image[rows][usable[rows]]))
    clean = image if everywhere else np.where(usable, image, level)
    steps = np.diff(clean[rows], axis=1)
    if not everywhere:
        steps = steps[usable[rows][:, 1:] & usable[rows][:, :-1]]
    if not steps.size:
        return None
    sigma = 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / np.sqrt(2.0)
    return (level, sigma, clean) if sigma > 0 else None


def spikes(image: np.ndarray, usable: np.ndarray, other: np.ndarray | None = None,
           other_usable: np.ndarray | None = None) -> np.ndarray:
    """Single-pixel spikes (hot pixels, dead pixels, cosmic-ray hits) of a sampled image.

    A pixel is a spike when it differs from the median of its 3x3
    neighbourhood by more than 10 robust sigmas of the pixel noise (from the
    differences of neighbouring pixels) and stands above (below) its four
    nearest neighbours; for a high pixel, that median must also rise above
    the image's median level by less than a quarter of the pixel's own
    height: a star whose core is sampled by its pixels lights its neighbours
    too (about half its peak for a FWHM of 3 px), a hot pixel does not.  A
    low pixel must also lie 10 sigmas below the median level: a dead pixel
    (a star cannot make one).  Pixels not ``usable`` are not judged and
    count as the median level.  Only pixels 10 sigmas from that level are
    examined, so the cost is about one pass over the image.  Alone, stars
    sharper than about 1.5 px FWHM look like spikes.  When more than 0.5 % of the pixels qualify, the
    image is not one of point sources on a sky (a photo, whose own detail is
    that sharp) and nothing is reported.  Given the ``other`` image of the
    pair, a candidate whose 3x3 neighbourhood there is lit (a pixel 5 sigmas
    and 2 % of the candidate's height from that image's sky) is light seen
    in both images, an undersampled star, and is not a spike: a defect is in
    one image only.
    """
    usable = np.asarray(usable, dtype=bool)
    found = np.zeros(image.shape, dtype=bool)
    if not usable.any() or min(image.shape) < 3:
        return found
    sky = _sky(image, usable)
    if sky is None:
        return found
    level, sigma, clean = sky
    threshold = _SPIKE_SIGMAS * sigma
    far = (clean > level + threshold) | (clean < level - threshold)  # candidates: few pixels on a sky
    ys, xs = np.nonzero(far[1:-1, 1:-1])
    if not len(ys):
        return found
    ys, xs = ys + 1, xs + 1
    value = clean[ys, xs]
    cross = np.stack([clean[ys - 1, xs], clean[ys + 1, xs], clean[ys, xs - 1], clean[ys, xs + 1]], axis=1)
    extreme = ((value > cross.max(axis=1)) & (value > level)) | ((value < cross.min(axis=1)) & (value < level))
    ys, xs, value = ys[extreme], xs[extreme], value[extreme]  # local extrema: star peaks and spikes
    dy, dx = np.mgrid[-1:2, -1:2]
    local = np.median(clean[ys[:, None] + dy.ravel(), xs[:, None] + dx.ravel()], axis=1)  # 3x3 medians
    high = (value > level) & (value - local > threshold) & (local - level < _SPIKE_SHARPNESS * (value - level))
    low = (value < level) & (local - value > threshold)
    spike = high | low
    if other is not None and spike.any():  # a source of light is in both images, a defect in one
        ok = np.ones(other.shape, dtype=bool) if other_usable is None else np.asarray(other_usable, dtype=bool)
        other_sky = _sky(other, ok) if ok.any() else None
        if other_sky is not None:
            o_level, o_sigma, o_clean = other_sky
            o_box = o_clean[ys[:, None] + dy.ravel(), xs[:, None] + dx.ravel()]
            seen = np.abs(np.median(o_box, axis=1) - o_level)
            lit = seen > np.maximum(_COUNTERPART_SIGMAS * o_sigma, _COUNTERPART_FRACTION * np.abs(value - level))
            spike &= ~(lit & high)  # no light makes a pixel darker than the sky: a low spike stays one
    if spike.sum() > _SPIKE_FRACTION * usable.sum():
        return found  # not an image of point sources on a sky: its own detail is that sharp
    found[ys[spike], xs[spike]] = True
    return found & usable
