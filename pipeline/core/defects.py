"""Defects nobody marked, found in the pixels: saturated cores and single-pixel spikes.

Both are sharper than any image of the sky can be.  A saturated star's core
is flat at the detector's limit (:func:`saturation_plateau`); a hot or dead
pixel stands alone above or below neighbours that a point spread function
would have lit too (:func:`spikes`).  In the *source* either spoils every
target pixel whose kernel footprint covers it, so the exact solver's robust
pass looks for them before fitting, and treats them as bad source pixels.
:func:`find_defects` finds both in a batch of tiles at once, with the
result of the two applied tile by tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = ["TileSkies", "find_defects", "row_medians", "saturation_plateau", "sky_statistics", "spikes",
           "tile_skies"]

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


def find_defects(images: np.ndarray, usable: np.ndarray | None, others: np.ndarray | None,
                 others_usable: np.ndarray | None, *, skies: TileSkies | None = None) -> np.ndarray:
    """Saturation plateaus and spikes of a batch of tiles, each judged with its other image.

    Equal, bit for bit, to ``saturation_plateau(images[i], u) | spikes(images[i], u, others[i],
    ou)`` for every tile ``i`` (``u = usable[i]``, all True when ``usable`` is None; ``ou =
    others_usable[i]`` or None), but computed for the whole batch at once: the sky statistics
    of all tiles by one partition, the candidates by one pass over the batch, the 3x3 medians
    of all candidates together, every comparison in the dtype the per-tile functions make it
    in.  The few tiles the batch does not serve are passed to the per-tile functions: those
    whose sky statistics (or whose other image's) meet a NaN among the usable pixels or have all
    their rows unusable, and, without a mask, those with a NaN anywhere.

    Parameters
    ----------
    images, others
        ``(n, ny, nx)`` float32 or float64 (others: the other images of the pairs, or None;
        other real dtypes are judged tile by tile).
    usable, others_usable
        ``(n, ny, nx)`` bool, or None (every pixel usable).
    skies
        :func:`tile_skies` of ``images`` and ``usable``, where already measured (the same result).

    Returns
    -------
    numpy.ndarray
        ``(n, ny, nx)`` bool map of the defects found.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise InputError(f"images must be (n, ny, nx), got shape {images.shape}")
    maps = {}
    for name, a, dtype in (("usable", usable, bool), ("others", others, None),
                           ("others_usable", others_usable, bool)):
        if a is not None:
            a = np.asarray(a, dtype=dtype)
            if a.shape != images.shape:
                raise InputError(f"{name} must have the shape of images {images.shape}, got {a.shape}")
        maps[name] = a
    usable, others, others_usable = maps["usable"], maps["others"], maps["others_usable"]
    n = len(images)
    found = np.zeros(images.shape, dtype=bool)
    if not found.size:
        return found
    floats = (np.dtype(np.float32), np.dtype(np.float64))
    if images.dtype not in floats or (others is not None and others.dtype not in floats):
        return _per_tile(found, range(n), images, usable, others, others_usable)
    images, usable, others, others_usable = (
        None if a is None else np.ascontiguousarray(a) for a in (images, usable, others, others_usable))
    with np.errstate(invalid="ignore", over="ignore"):
        fallback = _batch(found, images, usable, others, others_usable, skies)
    return _per_tile(found, np.nonzero(fallback)[0], images, usable, others, others_usable)


def _per_tile(found: np.ndarray, tiles, images: np.ndarray, usable: np.ndarray | None,
              others: np.ndarray | None, others_usable: np.ndarray | None) -> np.ndarray:
    """``found`` with the given tiles judged by :func:`saturation_plateau` and :func:`spikes`."""
    for i in tiles:
        u = np.ones(images.shape[1:], dtype=bool) if usable is None else usable[i]
        other = None if others is None else others[i]
        ou = None if others_usable is None else others_usable[i]
        found[i] = saturation_plateau(images[i], u) | spikes(images[i], u, other, ou)
    return found


def _batch(found: np.ndarray, images: np.ndarray, usable: np.ndarray | None, others: np.ndarray | None,
           others_usable: np.ndarray | None, skies: TileSkies | None = None) -> np.ndarray:
    """Mark in ``found`` the defects of the batch; return the tiles left to the per-tile functions.

    Every comparison is made in the dtype the per-tile functions make it in: a per-tile Python
    float meets an image in the image's dtype, a NumPy float64 scalar in float64.
    """
    n, ny, nx = images.shape
    inf = np.inf
    # -- the tiles' sky, for spikes
    rows = _sky_rows(ny)
    judged = np.full(n, min(ny, nx) >= 3)
    fallback = np.zeros(n, dtype=bool)
    if usable is not None:
        rows_usable = usable[:, rows].any(axis=(1, 2))
        empty = judged & ~rows_usable
        if empty.any():  # statistics from every row, or nothing usable at all
            fallback |= empty & usable.reshape(n, -1).any(axis=1)
        judged &= rows_usable
    level = np.zeros(n, dtype=images.dtype)
    sigma = np.full(n, np.nan)
    tiles = np.nonzero(judged)[0]
    if len(tiles):
        if skies is None:
            level[tiles], sigma[tiles], nan = _skies(images, usable, tiles, rows)
        else:  # (measured on every tile: each tile's statistics are its own)
            level[tiles], sigma[tiles], nan = skies.level[tiles], skies.sigma[tiles], skies.nan[tiles]
        fallback[tiles[nan]] = True
    judged &= sigma > 0
    threshold = _SPIKE_SIGMAS * sigma
    level64 = level.astype(np.float64)
    high_at = np.where(judged, level64 + threshold, inf)
    low_at = np.where(judged, level64 - threshold, -inf)
    # -- candidates: at a tile's top, or 10 sigmas from its sky
    top, at_top, pos = _scan(images, usable, high_at, low_at)
    fallback |= np.isnan(top)  # a NaN among the usable pixels
    judged &= ~fallback
    t, y, x = _unravel(pos, ny, nx)
    value = images.reshape(-1)[pos]
    _plateaus(found, pos, t, value >= at_top[t], images, usable, np.isfinite(top) & ~fallback)
    inside = (y > 0) & (y < ny - 1) & (x > 0) & (x < nx - 1) & judged[t]
    inside &= (value > high_at[t]) | (value < low_at[t])
    pos, t, value = pos[inside], t[inside], value[inside]
    lvl = level[t]
    cross = _boxes(images, usable, pos, lvl, np.array([-nx, nx, -1, 1]))
    up, down, left, right = cross.T  # columns: elementwise maxima are faster than reductions along rows
    extreme = (((value > np.maximum(np.maximum(up, down), np.maximum(left, right))) & (value > lvl))
               | ((value < np.minimum(np.minimum(up, down), np.minimum(left, right))) & (value < lvl)))
    pos, t, value, lvl = pos[extreme], t[extreme], value[extreme], lvl[extreme]  # star peaks and spikes
    local = np.median(_boxes(images, usable, pos, lvl, _DY * nx + _DX), axis=1)  # 3x3 medians
    thr = threshold[t]
    high = (value > lvl) & (value - local > thr) & (local - lvl < _SPIKE_SHARPNESS * (value - lvl))
    low = (value < lvl) & (local - value > thr)
    spike = high | low
    if others is not None and spike.any():
        fallback |= _counterparts(spike, high, pos, t, value, lvl, others, others_usable, rows)
    counts = np.bincount(t[spike], minlength=n)
    tiles = np.nonzero(counts)[0]
    if len(tiles):
        pixels = np.full(n, ny * nx)
        if usable is not None:
            pixels[tiles] = _usable_pixels(usable, tiles)
        kept = counts <= _SPIKE_FRACTION * pixels  # more: not an image of point sources on a sky
        spike &= kept[t]
        found.reshape(-1)[pos[spike]] = True
    return fallback


def _scan(images: np.ndarray, usable: np.ndarray | None, high_at: np.ndarray,
          low_at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each tile's top (its usable maximum), the plateau level below it (+inf where the top is not
    finite), and the ascending positions in the flattened batch of the usable pixels at or above
    either the plateau level or ``high_at``, or below ``low_at`` (float64).

    Chunks of tiles that stay in the cache: each pixel is read once from memory.  With a mask, the
    top of a tile is that of its candidates above ``high_at`` when it has some (a masked maximum
    costs as much as the rest); a tile without, or whose plateau level is not above ``high_at``,
    is searched again alone.  The top is NaN for a NaN among the usable pixels, except with a
    mask and candidates above ``high_at``: only a plateau depends on that (:func:`_plateaus`).
    """
    n, ny, nx = images.shape
    size = ny * nx
    dtype = images.dtype.type
    flat = images.reshape(n, size)
    ok = None if usable is None else usable.reshape(n, size)
    start = _next_above(high_at, dtype)  # x > high_at exactly when x >= start
    below = _round_up(low_at, dtype)  # x < low_at exactly when x < below
    top = np.full(n, -np.inf, dtype=images.dtype)
    found = []
    step = max(1, 2**18 // size)
    for i in range(0, n, step):
        chunk = slice(i, i + step)
        pixels = flat[chunk]
        if ok is None:
            top[chunk] = pixels.max(axis=1)
            far = pixels >= np.fmin(start[chunk], _plateau_level(top[chunk]))[:, None]
        else:
            far = pixels >= start[chunk, None]
        far |= pixels < below[chunk, None]
        found.append(np.flatnonzero(far) + i * size)
    pos = np.concatenate(found)
    if ok is None:
        return top, _plateau_level(top), pos
    pos = pos[ok.reshape(-1)[pos]]
    value = images.reshape(-1)[pos]
    high = value >= start[pos // size]
    t = pos[high] // size  # ascending
    first = np.flatnonzero(np.diff(t, prepend=-1))
    top[t[first]] = np.maximum.reduceat(value[high], first) if len(t) else top[:0]
    at_top = _plateau_level(top)
    again = np.nonzero((top == -np.inf) | (at_top < start))[0]
    if len(again):  # no usable pixel above high_at, or plateau pixels that need not be
        top[again] = np.max(flat[again], axis=1, where=ok[again], initial=-np.inf)
        at_top[again] = _plateau_level(top[again])
        extra = np.nonzero((flat[again] >= at_top[again, None]) & ok[again])
        pos = np.union1d(pos, again[extra[0]] * size + extra[1])
    return top, at_top, pos


def _plateau_level(top: np.ndarray) -> np.ndarray:
    """The least value of a saturation plateau below ``top`` (+inf where it is not finite)."""
    high = top.astype(np.float64)
    return np.where(np.isfinite(high), high - 1e-6 * np.abs(high), np.inf).astype(top.dtype)


def _plateaus(found: np.ndarray, pos: np.ndarray, t: np.ndarray, at_top: np.ndarray, images: np.ndarray,
              usable: np.ndarray | None, judged: np.ndarray) -> None:
    """Mark the saturation plateaus among the usable candidates at ``pos`` (ascending) ``at_top``.

    With a mask, a tile's top was not checked for NaN: a tile with a plateau and a NaN among its
    usable pixels has none (its top is NaN)."""
    n, ny, nx = found.shape
    keep = at_top & judged[t]
    keys, t = pos[keep], t[keep]
    count = np.bincount(t, minlength=n)
    enough = count >= _PLATEAU
    if not enough.any():
        return
    pixels = np.full(n, ny * nx)
    if usable is not None:
        tiles = np.nonzero(enough)[0]
        pixels[tiles] = _usable_pixels(usable, tiles)
    enough &= count <= 0.25 * pixels
    _, y, x = _unravel(keys, ny, nx)
    touching = np.zeros(len(keys), dtype=bool)
    for step, room in ((1, x < nx - 1), (nx, y < ny - 1)):
        at = np.minimum(np.searchsorted(keys, keys + step), len(keys) - 1)
        touching |= room & (keys[at] == keys + step)
    enough &= np.bincount(t[touching], minlength=n) > 0
    if usable is not None:
        tiles = np.nonzero(enough)[0]
        enough[tiles] = ~(np.isnan(images[tiles]) & usable[tiles]).any(axis=(1, 2))
    found.reshape(-1)[keys[enough[t]]] = True


def _counterparts(spike: np.ndarray, high: np.ndarray, pos: np.ndarray, t: np.ndarray, value: np.ndarray,
                  lvl: np.ndarray, others: np.ndarray, others_usable: np.ndarray | None,
                  rows: slice) -> np.ndarray:
    """Clear in ``spike`` the high candidates whose 3x3 box in the other image is lit; return the
    tiles left to the per-tile functions."""
    n = len(others)
    fallback = np.zeros(n, dtype=bool)
    tested = np.zeros(n, dtype=bool)
    tested[t[spike]] = True
    if others_usable is not None:
        tiles = np.nonzero(tested)[0]
        rows_usable = others_usable[:, rows][tiles].any(axis=(1, 2))
        empty = tiles[~rows_usable]
        if len(empty):  # statistics from every row, or no test at all
            fallback[empty[others_usable[empty].reshape(len(empty), -1).any(axis=1)]] = True
            tested[empty] = False
    tiles = np.nonzero(tested)[0]
    if not len(tiles):
        return fallback
    o_level = np.zeros(n, dtype=others.dtype)
    o_sigma = np.full(n, np.nan)
    o_level[tiles], o_sigma[tiles], nan = _skies(others, others_usable, tiles, rows)
    fallback[tiles[nan]] = True
    tested &= ~fallback & (o_sigma > 0)
    sel = np.nonzero(spike & tested[t])[0]
    if not len(sel):
        return fallback
    ts = t[sel]
    o_box = _boxes(others, others_usable, pos[sel], o_level[ts], _DY * others.shape[2] + _DX)
    seen = np.abs(np.median(o_box, axis=1) - o_level[ts])
    lit = seen > np.maximum(_COUNTERPART_SIGMAS * o_sigma[ts],
                            _COUNTERPART_FRACTION * np.abs(value[sel] - lvl[sel]))
    spike[sel] &= ~(lit & high[sel])  # no light makes a pixel darker than the sky: a low spike stays one
    return fallback


_DY, _DX = (d.ravel() for d in np.mgrid[-1:2, -1:2])


def _usable_pixels(usable: np.ndarray, tiles: np.ndarray) -> list[int]:
    """The number of usable pixels of each of the given tiles (a count per tile is several times
    faster than one along an axis)."""
    return [np.count_nonzero(usable[i]) for i in tiles]


def _unravel(pos: np.ndarray, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tile, row and column of positions in a flattened ``(n, ny, nx)`` batch."""
    t, rest = np.divmod(pos, ny * nx)
    y, x = np.divmod(rest, nx)
    return t, y, x


def _boxes(images: np.ndarray, usable: np.ndarray | None, pos: np.ndarray, level: np.ndarray,
           offsets: np.ndarray | int) -> np.ndarray:
    """The pixels at ``pos + offsets`` of the flattened (C-contiguous) batch, unusable ones at their
    tile's ``level``: ``(N, len(offsets))`` for an array of offsets, ``(N,)`` for one offset."""
    at = pos[:, None] + offsets if np.ndim(offsets) else pos + offsets
    box = images.reshape(-1)[at]
    if usable is not None:
        unusable = ~usable.reshape(-1)[at]
        if unusable.any():  # few
            box[unusable] = np.broadcast_to(level[:, None] if np.ndim(offsets) else level, box.shape)[unusable]
    return box


@dataclass(frozen=True)
class TileSkies:
    """Each tile's sky as :func:`find_defects` measures it (:func:`tile_skies`), ``(n,)`` each."""

    level: np.ndarray  # the median of the usable pixels of every sampled row (the images' dtype)
    sigma: np.ndarray  # the pixel noise: robust scatter of their neighbour differences over sqrt(2); NaN for none
    nan: np.ndarray  # bool: a NaN met these statistics


def _sky_rows(ny: int) -> slice:
    """The rows the sky is measured on: about 16 of them."""
    return slice(None, None, max(1, ny // 16))


def tile_skies(images: np.ndarray, usable: np.ndarray | None) -> TileSkies:
    """The sky of each tile of ``images`` (``(n, ny, nx)`` float32 or float64) from its ``usable`` pixels
    (``None``: all) of about 16 rows, as :func:`find_defects` measures it: pass it there and to the other
    steps that need it, and it is measured once.  Tiles without usable pixels in those rows get a NaN sigma."""
    n, ny = images.shape[:2]
    if n == 0:
        return TileSkies(np.zeros(0, dtype=images.dtype), np.zeros(0), np.zeros(0, dtype=bool))
    level, sigma, nan = _skies(images, usable, np.arange(n), _sky_rows(ny))
    return TileSkies(level, sigma, nan)


def sky_statistics(images: np.ndarray, skies: TileSkies | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sky of each tile of a batch of wholly usable ones, as :func:`spikes` measures it, in float64.

    From about 16 rows: ``level``, the median; ``sigma``, the pixel noise (the
    robust scatter of neighbour differences over sqrt(2)); ``spread``, the
    robust scatter of the pixels about the level.  ``(n,)`` each; NaN for
    tiles narrower than 2 pixels.  ``skies``: the level and noise, where
    already measured (:func:`tile_skies`): only the spread is measured.
    """
    n, ny = images.shape[:2]
    rows = images[:, _sky_rows(ny)].astype(np.float64)
    if skies is None:
        level, sigma, _ = _skies(rows, None, np.arange(n), slice(None))
    else:
        level, sigma = skies.level.astype(np.float64), skies.sigma
    spread = 1.4826 * row_medians(np.abs(rows.reshape(n, -1) - level[:, None]), None, own=True)[0]
    return level, sigma, spread


def _skies(images: np.ndarray, usable: np.ndarray | None, tiles: np.ndarray,
           rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_sky`'s level (image dtype) and sigma (float64, NaN for none) of the given tiles,
    whose ``rows`` hold usable pixels, and where a NaN met their statistics."""
    k = len(tiles)
    sampled = images[:, rows][tiles] if k < len(images) else images[:, rows]
    ok = None if usable is None else (usable[:, rows][tiles] if k < len(images) else usable[:, rows])
    steps = np.diff(sampled, axis=2).reshape(k, -1)
    flat = sampled.reshape(k, -1)  # a copy unless every row is sampled; reordered below
    level, _, nan = row_medians(flat, None if ok is None else ok.reshape(k, -1),
                                own=not np.may_share_memory(flat, images))
    pairs = None if ok is None else (ok[:, :, 1:] & ok[:, :, :-1]).reshape(k, -1)
    middle, _, nan_steps = row_medians(steps, pairs, own=pairs is None)
    spread, _, nan_spread = row_medians(np.abs(steps - middle[:, None]), pairs, own=True)
    sigma = 1.4826 * spread.astype(np.float64) / np.sqrt(2.0)  # NaN without steps
    return level, sigma, nan | nan_steps | nan_spread


def row_medians(values: np.ndarray, valid: np.ndarray | None,
                own: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.median`` of each row's valid values (bit for bit), their number, and whether one is NaN.

    Invalid entries become +inf, and each row gets as many -inf as puts its middle where the
    fullest row has it: one partition serves all rows.  ``own``: ``values`` may be reordered.
    """
    k, size = values.shape
    dtype = values.dtype.type
    count = np.full(k, size) if valid is None else np.count_nonzero(valid, axis=1)
    middle = (int(count.max(initial=0)) - 1) // 2  # every row's middle value(s) at middle, middle + 1
    if middle < 0:
        return np.full(k, np.nan, dtype=values.dtype), count, np.zeros(k, dtype=bool)
    if valid is not None:
        lows = middle - (count - 1) // 2
        work = np.empty((k, size + int(lows.max())), dtype=values.dtype)
        work[:, :size] = values
        np.copyto(work[:, :size], dtype(np.inf), where=~valid)
        work[:, size:] = np.where(np.arange(work.shape[1] - size) < lows[:, None], dtype(-np.inf), dtype(np.inf))
        values, own = work, True
    if own:
        values.partition(middle, axis=1)  # one kth: the fast selection
    else:
        values = np.partition(values, middle, axis=1)
    at = values[:, middle]
    above = values[:, middle + 1:].min(axis=1) if values.shape[1] > middle + 1 else at
    with np.errstate(invalid="ignore"):  # rows without values: -inf and inf, set to NaN below
        median = np.where(count % 2 == 1, at, np.mean(np.stack([at, above], axis=1), axis=1))
    median[count == 0] = np.nan
    return median, count, (np.isnan(at) | np.isnan(above)) & (count > 0)  # NaN goes last


def _next_above(h: np.ndarray, dtype: type) -> np.ndarray:
    """The ``v`` of ``dtype`` for which ``x > h`` exactly when ``x >= v`` (``x`` of dtype, ``h`` float64)."""
    f = h.astype(dtype)
    f = np.where(f.astype(np.float64) > h, np.nextafter(f, dtype(-np.inf)), f)  # the largest not above h
    return np.nextafter(f, dtype(np.inf))


def _round_up(h: np.ndarray, dtype: type) -> np.ndarray:
    """The ``g`` of ``dtype`` for which ``x < h`` exactly when ``x < g`` (``x`` of dtype, ``h`` float64)."""
    g = h.astype(dtype)
    return np.where(g.astype(np.float64) < h, np.nextafter(g, dtype(np.inf)), g)
