"""Which image of a pair is sharper, tile by tile.

Convention: for ``target = K (*) source (+ noise)`` the signal power spectra
obey ``P_T(f) = |K(f)|^2 P_S(f)`` whatever the scene. For Gaussian-like PSFs
``|K(f)|^2 = exp(-4 pi^2 (sigma_T^2 - sigma_S^2) |f|^2)``, so the slope of
``log(P_T / P_S)`` against ``|f|^2`` (``f`` in cycles per pixel), fitted over
the band where both images' signal stands well above their noise floors, is
``-4 pi^2 (sigma_T^2 - sigma_S^2)``. :func:`sharpness` reports

    ``width_difference = FWHM_T^2 - FWHM_S^2`` (pixels squared)

with ``FWHM = FWHM_PER_SIGMA * sigma``: positive where the target is blurrier
(a physical kernel exists), negative where the target is sharper (matching
target to source would be a deconvolution). Swapping the two images negates
it exactly (every step treats them alike), scaling either image's flux leaves
it unchanged, and a pure shift gives about zero.

Each tile is stripped of its mean, multiplied by a separable Hann taper (no
edge cross) and by the union of both images' good-pixel maps (bad pixels:
NaN, or nonzero in ``mask``; the same pixels are dropped from both images, so
the comparison stays like for like). Unflagged hot and dead pixels and
cosmic-ray hits of either image (:func:`spikes`: sharper than a star, or
light the other image has not got) are dropped from both the same way. Power
is summed in rings of ``|f|``. The white noise floor of each image is the
lower of its mean powers in ``0.4 <= |f| < 0.5`` and in the corners beyond
``|f| = 0.5`` (where a PSF of FWHM >= 2 px leaves no signal), and at least
``sum(taper^2 var)`` when per-pixel variances are given; the floor also takes
up the white power of any hot pixel left. Rings where both images keep
``SIGNAL_TO_FLOOR`` times their floor enter a weighted straight-line fit; the
weights are the inverse variances of the ring log-powers from the noise (the
taper's correlation of neighbouring modes counted), and the slope error is
inflated by the reduced chi-square when the rings scatter more than that.

The alternative measured next to it, :func:`autocorrelation_width_difference`,
takes fixed-weight Gaussian second moments of the noise-free autocorrelation
peaks (``var(ACF) = var(scene ACF) + 2 sigma^2``). It finds the direction as
often, but the scene's own autocorrelation leaks into the weighted moments
(the widths of 8 tiles at FWHM ratio 0.7 and 1.4: -11.6 and +10.0 px^2
against -9.4 and +8.6, where the power-ratio slope gives -9.3 and +8.5), it
has no uncertainty and costs more; the power-ratio slope is the measure kept.

Measured with ``scripts/bench_direction.py`` (256^2 tiles, Moffat PSF of FWHM
3 px for the sharper image, FWHM ratios 0.7-1.4, 8 tiles per ratio; fields of
0.0005, 0.002 and 0.02 stars and half as many galaxies per pixel): the
direction is right for 100 % of the tiles whose FWHMs differ by more than
10 % in all three fields (98 % counting the ratios 0.9 and 1.1 themselves in
the sparsest field, 100 % in the others); no tile whose source is sharper or
equal is flagged ``target_sharper``, nor with unflagged hot and dead pixels
(0.1 %) and 10 cosmic rays per tile (then the direction is right for 97.5 %
of the sparsest field's tiles: one of 40 reads -0.5 px^2, nearly equal, where
the truth is +4); every tile with the target sharper by more than 10 % is
flagged in the two denser fields (88 % in the sparsest, the rest
``nearly_equal``); every tile within 5 % is ``nearly_equal``. In whole jobs
(``scripts/bench_direction_jobs.py``: 1024x2048 images whose seeing changes
across the field, crossing over in some) likewise 100 % of such tiles. Cost,
one thread, on a machine where ``estimate_kernels`` takes 26 ms per tile
without the measure (default) and 10 ms (``welch``): 2.8 ms per tile, 0.9 ms
of it the spectra and fit, the rest finding unflagged spikes
(``despike=False`` skips that).

:func:`spectra_sharpness` takes the same measure from power spectra already
summed over a tile's segments (Welch's: no transform of its own), in rings
one mode wide. On the fields above it is as often right, scatters less
(ratio 1.0: 0.20, 0.05, 0.012 px^2 against 1.12, 0.07, 0.023) and reads
3-7 % lower for wide kernels (the segments' coarser frequency grid);
figures in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse

from ..errors import InputError, OptionError
from .defects import TileSkies, row_medians
from .moments import FWHM_PER_SIGMA
from .validate import as_image_stack

__all__ = [
    "MIN_TILE",
    "NEARLY_EQUAL_Z",
    "SIGNAL_TO_FLOOR",
    "TARGET_SHARPER_TOLERANCE",
    "Sharpness",
    "autocorrelation_width_difference",
    "direction_flags",
    "image_direction",
    "sharpness",
    "pair_spikes",
    "spectra_sharpness",
    "spikes",
]

#: ``target_sharper`` needs ``FWHM_T^2 - FWHM_S^2 < -TARGET_SHARPER_TOLERANCE``
#: (pixels squared). A kernel that would have to remove a Gaussian narrower
#: than one pixel FWHM is a sub-pixel sharpening that a kernel stamp resolves
#: as a (slightly negative-winged) delta; only beyond that is the fit a real
#: deconvolution. At 3 px seeing 1 px^2 is a 5.5 % FWHM difference, inside the
#: 10 % the direction must be right for.
TARGET_SHARPER_TOLERANCE: float = 1.0

#: A difference within ``NEARLY_EQUAL_Z`` of its uncertainty (or within the
#: tolerance above) is ``nearly_equal``; a ``target_sharper`` flag needs the
#: difference beyond both.
NEARLY_EQUAL_Z: float = 3.0

#: A ring of frequencies enters the fit where both images' signal power is at
#: least this many times their noise floor.
SIGNAL_TO_FLOOR: float = 1.0

#: A spike stands this many noise sigmas above the mean of its eight neighbours ...
SPIKE_SIGMAS: float = 8.0
#: ... which hold less than this fraction of its value.
SPIKE_SHARPNESS: float = 0.25
#: A pixel over SPIKE_UNMATCHED times the brightest pixel near it in the other image (on
#: this one's flux scale), plus SPIKE_SIGMAS_ALONE sigmas, is light the other image has not
#: got: a cosmic ray or a hot pixel. A star's peak is at most about twice as high in the
#: sharper image for FWHM ratios down to 0.7; beyond that its core is told from a track by its
#: shape (see :func:`_unmatched`).
SPIKE_UNMATCHED: float = 3.0
SPIKE_SIGMAS_ALONE: float = 5.0
#: "Near": within this many pixels (a misregistration of the pair up to that).
SPIKE_MATCH_RADIUS: int = 4
#: A tile with more spikes than this fraction of its pixels is not an image of the sky (a photograph's texture):
#: :func:`pair_spikes` reports none of them.
SPIKE_MOST: float = 0.005
#: Passes of the spike test (each peels a pixel off both ends of a cosmic-ray track).
SPIKE_PASSES: int = 4

_N_RINGS = 32              # rings of |f| from 0 to 0.5 cycles/px (and beyond, to the corners)
_FLOOR_FROM = 0.4          # the noise floor is measured beyond this |f|
_LOWEST_RING_CYCLES = 3.0  # rings below 3 cycles per tile hold the taper's leakage: skipped
_MIN_RINGS = 3
_HANN_ENBW = 2.25          # equivalent noise bandwidth of the 2-D Hann taper, in modes (1.5 a side)
_MIN_SIZE = 16
_CHUNK = 8                 # tiles whose spikes and spectra are found at once (the temporaries stay small)
#: Smallest tile side measured, pixels.
MIN_TILE: int = _MIN_SIZE


@dataclass(frozen=True)
class Sharpness:
    """Which image is sharper, per tile. Arrays of shape ``(n,)``.

    Attributes
    ----------
    width_difference
        ``FWHM_T^2 - FWHM_S^2``, pixels squared (Gaussian-equivalent widths);
        NaN where no band of frequencies was usable.
    uncertainty
        Its one-sigma uncertainty, pixels squared.
    direction
        ``+1`` target blurrier (forward kernel), ``-1`` target sharper,
        ``0`` not measured.
    rings
        Number of frequency rings in the fit (0 where not measured).
    band
        Highest ``|f|`` used, cycles per pixel (0 where not measured).
    target_sharper
        The target is sharper beyond ``TARGET_SHARPER_TOLERANCE`` and beyond
        ``NEARLY_EQUAL_Z`` uncertainties.
    nearly_equal
        ``|width_difference|`` within the tolerance or ``NEARLY_EQUAL_Z``
        uncertainties: the kernel is close to a delta and poorly constrained.
    """

    width_difference: np.ndarray
    uncertainty: np.ndarray
    direction: np.ndarray
    rings: np.ndarray
    band: np.ndarray
    target_sharper: np.ndarray
    nearly_equal: np.ndarray


def _as_tiles(array: object, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = as_image_stack(array, name, ndim=(2, 3))
    if shape is not None:
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise InputError(f"{name} of shape {arr.shape} does not match the tiles {shape}; "
                             "give it per tile (n, h, w) or one (h, w)") from None
    return arr


def _hann(n: int) -> np.ndarray:
    return np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def _prepare(source, target, mask, variance, source_variance, despike=True):
    tgt = as_image_stack(target, "target", ndim=(2, 3))
    if tgt.ndim == 2:
        tgt = tgt[None]
    shape = tgt.shape
    if min(shape[1:]) < _MIN_SIZE:
        raise InputError(f"tiles must be at least {_MIN_SIZE} x {_MIN_SIZE} pixels, got "
                         f"{shape[1:]}; use larger tiles")
    src = _as_tiles(source, "source", shape)
    both = np.empty((2, *shape), dtype=np.float32)  # source and target, bad pixels 0
    np.copyto(both[0], src, casting="unsafe")
    np.copyto(both[1], tgt, casting="unsafe")
    good = np.isfinite(both).all(axis=0)
    if mask is not None:
        good &= ~_as_tiles(mask, "mask", shape).astype(bool)
    variances: list[np.ndarray | None] = []
    for name, var in (("source_variance", source_variance), ("variance", variance)):
        if var is None:
            variances.append(None)
            continue
        v = _as_tiles(var, name, shape).astype(np.float64)
        bad = ~np.isfinite(v) | (v < 0)
        variances.append(np.where(good & ~bad, v, 0.0))
        good &= ~bad
    np.copyto(both, np.float32(0.0), where=~good)
    if despike:
        for start in range(0, len(good), _CHUNK):  # a few tiles at a time: the temporaries stay small
            part = slice(start, start + _CHUNK)
            good[part] &= ~_pair_spikes(both[0, part], both[1, part], good[part])
        np.copyto(both, np.float32(0.0), where=~good)
    return both, good, variances


def _max_run(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Maximum over ``size`` consecutive elements along ``axis`` (a window starting at each)."""

    def part(a: np.ndarray, start: int, n: int) -> np.ndarray:
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, start + n)
        return a[tuple(index)]

    out, width = x, 1
    while width * 2 <= size:  # windows of 1, 2, 4, 8 ... by doubling
        n = out.shape[axis] - width
        out = np.maximum(part(out, 0, n), part(out, width, n))
        width *= 2
    if width < size:  # the rest: one more overlapping window
        n = out.shape[axis] - (size - width)
        out = np.maximum(part(out, 0, n), part(out, size - width, n))
    return out


def _median_or_zero(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each tile's median of its ``valid`` values (``np.median``'s, bit for bit), 0 where it has none."""
    n = len(values)
    median, count, _ = row_medians(values.reshape(n, -1), valid.reshape(n, -1))
    return np.where(count > 0, median, 0.0)


def _robust_sigma(x: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Per-tile noise sigma from the median absolute difference of horizontal neighbours."""
    d = np.abs(np.diff(x[:, ::4], axis=2))
    ok = good[:, ::4, 1:] & good[:, ::4, :-1]
    return _median_or_zero(d, ok) / (0.6745 * math.sqrt(2.0))


def _sky_sigma(image: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile median sky and robust noise sigma, ``(n,)`` each (float32)."""
    sky = _median_or_zero(image[:, ::4, ::4], good[:, ::4, ::4]).astype(np.float32)
    return sky, _robust_sigma(image, good).astype(np.float32)


_EIGHT = np.ones(8)
_EIGHT_COUNTS = np.ones(8, dtype=np.uint8)


def _neighbours(w: int) -> np.ndarray:
    """Flat offsets of a pixel's eight neighbours in tiles ``w`` pixels wide."""
    return np.array([-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1])


def _interior(index: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The flat ``index``es (into ``(n, h, w)`` tiles) not on a tile's outermost rows and columns."""
    _, h, w = shape
    y, x = (index // w) % h, index % w
    return index[(y > 0) & (y < h - 1) & (x > 0) & (x < w - 1)]


def _peel(image: np.ndarray, good: np.ndarray, sky: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Spikes by their neighbours alone, the test repeated without what it found: their flat indices.

    Only pixels far enough from the sky to be spikes are tested, off the
    tiles' outermost rows and columns (where the taper leaves no weight):
    their neighbours are gathered, not the whole tiles filtered.
    """
    _, h, w = image.shape
    hi = (sky + 0.5 * SPIKE_SIGMAS * sigma)[:, None, None]
    lo = (sky - SPIKE_SIGMAS * sigma)[:, None, None]
    cand = _interior(np.flatnonzero(good & ((image > hi) | (image < lo))), image.shape)
    tile = cand // (h * w)
    values = image.reshape(-1)
    usable = good.reshape(-1).copy()
    around = cand[:, None] + _neighbours(w)[None, :]
    level = sky[tile].astype(np.float64)
    v = values[cand] - level
    near_values = values[around] - level[:, None]
    sig = sigma[tile]
    spike = np.zeros(cand.size, dtype=bool)
    for _ in range(SPIKE_PASSES):
        u = usable[around]
        # sums of 8 by products with ones: numpy's reductions along a short last axis are several times slower
        near = ((near_values * u) @ _EIGHT) / np.maximum(u.view(np.uint8) @ _EIGHT_COUNTS, 1)
        excess = v - near
        new = usable[cand] & (((excess > SPIKE_SIGMAS * sig) & (near < SPIKE_SHARPNESS * v))
                              | ((excess < -SPIKE_SIGMAS * sig) & (v < -SPIKE_SIGMAS * sig)))
        if not new.any():
            break
        spike |= new
        usable[cand[new]] = False
    return cand[spike]


def _unmatched(x: np.ndarray, sky_x, sigma_x, peel_x, y: np.ndarray, sky_y, sigma_y, peel_y,
               good: np.ndarray, scaled_only: bool = False) -> np.ndarray:
    """Light in ``x`` that ``y`` has not got near by, on ``x``'s flux scale: flat indices (``scaled_only``:
    none in a tile without the 10 pixels lit in both that measure the scale; else the scale is taken as 1).

    "Near": the brightest pixel of ``y`` (its spikes ``peel_y`` left out) in
    the 2x2 blocks within two blocks of the pixel's, which reaches 4 to 5
    pixels (``SPIKE_MATCH_RADIUS``) either way.  And the light is sharp in
    ``x``: its dimmest 4-neighbour holds less than ``SPIKE_SHARPNESS`` of its
    height (a track's neighbour across it; a star's core keeps more at FWHM >=
    2 px, however much more the other image spreads it).
    """
    n, h, w = x.shape
    r = SPIKE_MATCH_RADIUS // 2
    cleaned = y
    if peel_y.size:  # (most tiles have no spike)
        cleaned = y.copy()
        cleaned.reshape(-1)[peel_y] = sky_y[peel_y // (h * w)]
    if h % 2 or w % 2:
        cleaned = np.pad(cleaned, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    rows = np.maximum(cleaned[:, 0::2], cleaned[:, 1::2])  # pairs of whole rows, then of their columns
    blocks = np.maximum(rows[:, :, 0::2], rows[:, :, 1::2])
    padded = np.pad(blocks, ((0, 0), (r, r), (r, r)), mode="edge")
    nearby = _max_run(_max_run(padded, 2 * r + 1, 2), 2 * r + 1, 1)
    # only pixels SPIKE_SIGMAS_ALONE sigmas above the sky can qualify
    index = np.flatnonzero(good & (x > (sky_x + SPIKE_SIGMAS_ALONE * sigma_x)[:, None, None]))
    t, yy, xx = index // (h * w), (index // w) % h, index % w
    x_at = x.reshape(-1)[index] - sky_x[t]
    y_at = cleaned[t, yy, xx] - sky_y[t]
    near = nearby[t, yy // 2, xx // 2] - sky_y[t]
    # the flux scale: the median ratio of the pixels lit in both (the spikes of either left out)
    lit = (y_at > 5.0 * sigma_y[t]) & ~np.isin(index, peel_x, assume_unique=True)
    counts = np.bincount(t[lit], minlength=n)
    scale = np.where(counts >= 10, _tile_medians(x_at[lit] / y_at[lit], t[lit], counts), np.float32(1.0))
    unmatched = x_at > SPIKE_UNMATCHED * np.maximum(near, 0.0) * scale[t] + SPIKE_SIGMAS_ALONE * sigma_x[t]
    if scaled_only:
        unmatched &= counts[t] >= 10
    # and sharp in x: a track (or a lone pixel) has a 4-neighbour across it at the sky, a star's core has none
    # (a bright star in the sharper image of a pair blurred more than SPIKE_UNMATCHED allows for is no spike);
    # a wide track's inner pixels are taken with the sharp ones they touch
    pick = np.flatnonzero(unmatched)
    t, yy, xx = t[pick], yy[pick], xx[pick]
    steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
    dimmest = np.minimum.reduce([x[t, np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)]
                                 for dy, dx in steps]) - sky_x[t]
    found = index[pick]
    taken = dimmest < SPIKE_SHARPNESS * x_at[pick]
    inside = [(yy + dy >= 0) & (yy + dy < h) & (xx + dx >= 0) & (xx + dx < w) for dy, dx in steps]
    while True:  # a pixel next to a taken one is taken too: a wide track's inner pixels
        grown = taken.copy()
        for ok, (dy, dx) in zip(inside, steps):
            grown |= ok & np.isin(found + dy * w + dx, found[taken])
        if (grown == taken).all():
            return found[taken]
        taken = grown


def _tile_medians(values: np.ndarray, tiles: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each tile's median of its ``values`` (``np.median``'s, bit for bit; ``tiles`` their tiles, ``counts``
    how many each tile has), in the values' dtype; the tiles without any get 0."""
    out = np.zeros(counts.size, dtype=values.dtype)
    if not values.size:
        return out
    if np.any(tiles[1:] < tiles[:-1]):  # (values from flat indices come grouped by tile already)
        order = np.argsort(tiles, kind="stable")
        values = values[order]
    ends = np.cumsum(counts)
    for tile in np.flatnonzero(counts):
        out[tile] = np.median(values[ends[tile] - counts[tile]:ends[tile]])
    return out


def _grown(found: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A boolean ``shape`` mask of the flat indices ``found`` and their eight neighbours."""
    _, h, w = shape
    t, yy, xx = found // (h * w), (found // w) % h, found % w
    out = np.zeros(shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[t, np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)] = True
    return out


def spikes(image: np.ndarray, good: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """Pixels sharper than any image of the sky: hot and dead pixels, cosmic-ray hits.

    A pixel is a spike where it stands ``SPIKE_SIGMAS`` noise sigmas above
    the mean of its usable neighbours and that mean holds less than
    ``SPIKE_SHARPNESS`` of its value (a star's neighbours keep a third or more
    of its peak at FWHM >= 2 px), or lies that far below both the sky and its
    neighbours (a dead pixel); the test is repeated ``SPIKE_PASSES`` times
    without what was found, which peels tracks from their ends (pixels on a
    tile's outermost rows and columns are not tested: the taper gives them
    no weight). With the ``other`` image of the pair, a pixel more than
    ``SPIKE_UNMATCHED`` times the brightest pixel within ``SPIKE_MATCH_RADIUS``
    (4 to 5 pixels: 2x2 blocks) there (on this image's
    flux scale, the median ratio of the pixels lit in both), plus
    ``SPIKE_SIGMAS_ALONE`` sigmas, and sharp (its dimmest 4-neighbour holds
    less than ``SPIKE_SHARPNESS`` of it, or it touches such a pixel found so),
    is a spike too: light the other image has not got (a cosmic-ray track, on
    sky or on a galaxy; not the core of a bright star that the other image
    spreads more). All found is grown by one pixel.

    Parameters
    ----------
    image
        ``(n, h, w)`` tiles.
    good
        ``(n, h, w)`` usable pixels; others are ignored.
    other
        Optional ``(n, h, w)`` other image of the pair (same scene).

    Returns
    -------
    numpy.ndarray
        Boolean ``(n, h, w)``.
    """
    good = np.asarray(good, dtype=bool)
    image = np.where(good, np.asarray(image, dtype=np.float32), np.float32(0.0))  # bad pixels: 0, unused
    sky, sigma = _sky_sigma(image, good)
    found = _peel(image, good, sky, sigma)
    if other is not None:
        other = np.where(good, np.asarray(other, dtype=np.float32), np.float32(0.0))
        sky_o, sigma_o = _sky_sigma(other, good)
        found = np.concatenate([found, _unmatched(image, sky, sigma, found, other, sky_o, sigma_o,
                                                  _peel(other, good, sky_o, sigma_o), good)])
    return _grown(found, image.shape)


def _pair_spikes(src: np.ndarray, tgt: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``spikes(src, good, tgt) | spikes(tgt, good, src)``, each image's part found once."""
    return _grown(np.concatenate(_spike_indices(src, tgt, good)), good.shape)


def _spike_indices(src: np.ndarray, tgt: np.ndarray, good: np.ndarray, scaled_only: bool = False,
                   skies: tuple[TileSkies | None, TileSkies | None] = (None, None)) -> tuple[np.ndarray, np.ndarray]:
    """The flat indices of the spikes of ``src`` and of ``tgt`` (float32, 0 where not ``good``), the other
    image of the pair given: :func:`spikes`, not grown (``scaled_only``: unmatched light only in tiles
    whose flux scale is measured; ``skies``: each image's sky, where measured already)."""
    ss, gs = _given_sky(src, good, skies[0])
    st, gt = _given_sky(tgt, good, skies[1])
    ps, pt = _peel(src, good, ss, gs), _peel(tgt, good, st, gt)
    return (np.concatenate([ps, _unmatched(src, ss, gs, ps, tgt, st, gt, pt, good, scaled_only)]),
            np.concatenate([pt, _unmatched(tgt, st, gt, pt, src, ss, gs, ps, good, scaled_only)]))


def _given_sky(image: np.ndarray, good: np.ndarray, sky: TileSkies | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sky_sigma`, or the level and noise of ``sky`` where it measured them."""
    if sky is None:
        return _sky_sigma(image, good)
    level, sigma = sky.level.astype(np.float32), sky.sigma.astype(np.float32)
    missing = sky.nan | ~np.isfinite(sigma) | ~np.isfinite(level)
    if missing.any():
        own = _sky_sigma(image[missing], good[missing])
        level[missing], sigma[missing] = own
    return level, sigma


def pair_spikes(source: np.ndarray, target: np.ndarray, source_bad: np.ndarray | None = None,
                target_bad: np.ndarray | None = None, *,
                skies: tuple[TileSkies, TileSkies] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each image's spikes (:func:`spikes`, the other image of the pair given), not grown.

    ``source`` and ``target`` are ``(n, h, w)`` tiles of one scene, finite
    except at their bad pixels (``source_bad``, ``target_bad``: boolean maps
    or ``None``), which are ignored in both.  Returns two boolean
    ``(n, h, w)`` maps, the source's and the target's: hot and dead pixels,
    and light the other image has not got (cosmic-ray tracks), one pixel
    wide where they are, so that an estimator can fill them like other
    isolated bad pixels.  Light is "not got" only on the flux scale the two
    images share (the median ratio of the pixels lit in both): a tile with
    fewer than 10 such pixels has no unmatched light, whatever the two
    images' units.  :data:`_CHUNK` tiles at a time.  ``skies``: each image's
    sky (:func:`pipeline.core.defects.tile_skies`), where measured already;
    else it is measured here (from every fourth row and column).
    """
    shape = source.shape
    found_s = np.zeros(shape, dtype=bool)
    found_t = np.zeros(shape, dtype=bool)
    if min(shape[1:]) < 3:
        return found_s, found_t
    area = math.prod(shape[1:])
    for start in range(0, shape[0], _CHUNK):
        part = slice(start, start + _CHUNK)
        src = source[part].astype(np.float32, copy=False)
        tgt = target[part].astype(np.float32, copy=False)
        good = np.ones(src.shape, dtype=bool)
        if source_bad is not None or target_bad is not None:
            for bad in (source_bad, target_bad):
                if bad is not None:
                    good &= ~bad[part]
            zero = np.float32(0.0)
            src, tgt = np.where(good, src, zero), np.where(good, tgt, zero)
        given = (None, None) if skies is None else tuple(
            TileSkies(sky.level[part], sky.sigma[part], sky.nan[part]) for sky in skies)
        for found, index in zip((found_s, found_t), _spike_indices(src, tgt, good, scaled_only=True, skies=given)):
            index = np.unique(index)  # a pixel may be found by both tests
            # so many in a tile: not an image of the sky (a photograph's texture), none taken
            many = np.bincount(index // area, minlength=len(src)) > SPIKE_MOST * area
            found[part].reshape(-1)[index[~many[index // area]]] = True
    return found_s, found_t


@functools.lru_cache(maxsize=8)
def _geometry(h: int, w: int, rings: int = _N_RINGS) -> tuple[np.ndarray, ...]:
    """Taper, ring index of every rfft2 mode, ring centres' ``|f|``, mode counts, the taper's nonzero
    modes (rows, columns, values), and the (rings x modes) sparse matrix that sums the modes of each ring
    (``rings`` of them from 0 to 0.5 cycles per pixel, and more to the corners)."""
    fy = scipy.fft.fftfreq(h)[:, None]
    fx = scipy.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    step = 0.5 / rings
    n_rings = int(math.ceil(math.sqrt(0.5) / step)) + 1
    index = np.minimum((f / step).astype(np.intp), n_rings - 1)
    counts = np.bincount(index.ravel(), minlength=n_rings).astype(np.float64)
    sums = np.bincount(index.ravel(), weights=f.ravel(), minlength=n_rings)
    centre = np.where(counts > 0, sums / np.maximum(counts, 1.0), np.inf)
    taper = (_hann(h)[:, None] * _hann(w)[None, :]).astype(np.float32)
    # the taper's spectrum is nonzero in a few modes only: what removing a whole tile's mean changes
    spectrum = scipy.fft.rfft2(taper.astype(np.float64))
    by, bx = np.nonzero(np.abs(spectrum) > 1e-9 * np.abs(spectrum).max())
    out = (taper, index, centre, counts, by, bx, spectrum[by, bx].astype(np.complex64))
    for a in out:
        a.flags.writeable = False
    ring_sums = scipy.sparse.csr_matrix((np.ones(index.size, dtype=np.float32), (index.ravel(), np.arange(index.size))),
                                        shape=(n_rings, index.size))
    return (*out, ring_sums)


def _spectra(both: np.ndarray, good: np.ndarray):
    """Ring sums of the power of the tapered, mean-free tiles, ``(2, n, rings)``; :data:`_CHUNK` tiles at a
    time (the temporaries stay small)."""
    n, h, w = good.shape
    taper, _, centre, counts, by, bx, taper_modes, ring_sums = _geometry(h, w)
    weight = taper * good  # float32
    whole = good.reshape(n, -1).all(axis=1)
    sums = np.empty((2, n, centre.size))
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        wt = weight[part]
        tapered = both[:, part] * wt
        wsum = wt.sum(axis=(1, 2), dtype=np.float64)
        mean = (tapered.sum(axis=(2, 3), dtype=np.float64) / np.where(wsum > 0, wsum, 1.0)).astype(np.float32)
        # the mean of a tile with every pixel good comes off the taper's few modes after the transform
        full = whole[part]
        some = np.flatnonzero(~full)
        if some.size:
            tapered[:, some] -= mean[:, some, None, None] * wt[some]
        spec = scipy.fft.rfft2(tapered, workers=1)
        all_good = np.flatnonzero(full)
        if all_good.size:
            spec[:, all_good[:, None], by, bx] -= mean[:, all_good, None] * taper_modes
        pairs = spec.view(np.float32)
        np.square(pairs, out=pairs)
        power = pairs[..., 0::2] + pairs[..., 1::2]
        c = tapered.shape[1]
        # float32 sums of the rings' modes
        sums[:, part] = (ring_sums @ power.reshape(2 * c, -1).T).T.reshape(2, c, centre.size)
    return sums, centre, counts, weight


def _fit(rings, floor, centre, counts, size, looks=1.0):
    """Weighted straight line of ``log(P_T / P_S)`` against ``|f|^2`` over the usable rings (each ring's
    power the mean of ``looks`` independent spectra, ``(n,)`` or a number)."""
    signal = rings - floor[..., None]
    usable = ((signal >= SIGNAL_TO_FLOOR * floor[..., None]).all(axis=0)
              & (centre >= _LOWEST_RING_CYCLES / size) & (centre <= 0.5)
              & (counts >= 4))
    safe = np.where(usable, signal, 1.0)
    y = np.log(safe[1]) - np.log(safe[0])
    # variance of a ring mean of |s + noise|^2 about |s|^2: (2 S N + N^2) / m
    # (the taper correlates neighbouring modes: a ring holds counts / _HANN_ENBW independent ones)
    rel = (2.0 * safe * floor[..., None] + floor[..., None] ** 2) * _HANN_ENBW / (
        np.maximum(counts, 1.0) * np.reshape(looks, (-1, 1)) * safe * safe)
    wts = np.where(usable, 1.0 / (rel[0] + rel[1]), 0.0)
    x = np.broadcast_to(np.where(np.isfinite(centre), centre, 0.0) ** 2, wts.shape)
    k = usable.sum(axis=1)
    sw = wts.sum(axis=1)
    ok = (k >= _MIN_RINGS) & (sw > 0)
    sw = np.where(ok, sw, 1.0)
    xm = (wts * x).sum(axis=1) / sw
    ym = (wts * y).sum(axis=1) / sw
    sxx = (wts * (x - xm[:, None]) ** 2).sum(axis=1)
    ok &= sxx > 0
    sxx = np.where(ok, sxx, 1.0)
    slope = (wts * (x - xm[:, None]) * (y - ym[:, None])).sum(axis=1) / sxx
    resid = y - ym[:, None] - slope[:, None] * (x - xm[:, None])
    chi2 = (wts * resid * resid).sum(axis=1) / np.maximum(k - 2, 1)
    slope_err = np.sqrt(np.maximum(chi2, 1.0) / sxx)
    return ok, k, slope, slope_err, usable


def sharpness(
    source: np.ndarray,
    target: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    source_variance: np.ndarray | None = None,
    tolerance: float = TARGET_SHARPER_TOLERANCE,
    despike: bool = True,
) -> Sharpness:
    """Measure, per tile, whether the target is blurrier or sharper than the source.

    Parameters
    ----------
    source
        ``(h, w)`` (shared by every tile) or ``(n, h, w)``; NaN marks bad pixels.
    target
        ``(n, h, w)`` tiles (or one ``(h, w)`` tile); NaN marks bad pixels.
    mask
        Optional, like ``target`` or ``(h, w)``: nonzero marks a bad pixel.
    variance, source_variance
        Optional per-pixel noise variances of the target and the source.
    tolerance
        ``target_sharper`` threshold on ``FWHM_S^2 - FWHM_T^2``, pixels squared.
    despike
        Drop unflagged hot pixels and cosmic-ray hits of either image
        (:func:`spikes`) from both.

    Returns
    -------
    Sharpness
        See its attributes; the measure is ``FWHM_T^2 - FWHM_S^2``.

    Raises
    ------
    InputError
        If the images, mask or variances are not real arrays of matching
        shapes, or the tiles are smaller than 16 x 16.
    OptionError
        If ``tolerance`` is not a finite number >= 0.
    """
    tol = _check_tolerance(tolerance)
    both, good, (var_s, var_t) = _prepare(source, target, mask, variance, source_variance, despike)
    h, w = good.shape[1:]
    sums, centre, counts, weight = _spectra(both, good)
    floors = [None if var is None else np.einsum("nyx,nyx->n", weight * weight, var) for var in (var_s, var_t)]
    return _measure(sums, centre, counts, min(h, w), tol, floors=floors)


def _check_tolerance(tolerance: float) -> float:
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        tol = math.nan
    if not (math.isfinite(tol) and tol >= 0.0):
        raise OptionError(f"tolerance must be a finite number >= 0 (pixels squared), got {tolerance!r}")
    return tol


def spectra_sharpness(
    source_power: np.ndarray,
    target_power: np.ndarray,
    looks: np.ndarray,
    *,
    tolerance: float = TARGET_SHARPER_TOLERANCE,
) -> Sharpness:
    """The measure of :func:`sharpness` from power spectra already averaged over segments of the tiles.

    For an estimator that has them anyway (``welch``: the summed powers of
    its tapered, mean-free segments), so the measure costs no transform of
    its own and sees the pixels the kernel is fitted to.  The rings are one
    mode wide (up to 32 of them to ``|f| = 0.5``), and each ring's noise is
    that of ``looks`` independent spectra (the segments averaged).

    Parameters
    ----------
    source_power, target_power
        ``(n, s, s // 2 + 1)`` half spectra (``rfft2`` layout) of the
        squared moduli of the tapered segments' transforms, summed over each
        tile's segments.
    looks
        ``(n,)`` segments summed per tile (0: the tile is not measured).
    tolerance
        As for :func:`sharpness`.

    Returns
    -------
    Sharpness
    """
    tol = _check_tolerance(tolerance)
    n, s, half = source_power.shape
    if target_power.shape != source_power.shape or half != s // 2 + 1:
        raise InputError(f"source_power and target_power must be (n, s, s // 2 + 1) half spectra of one shape, "
                         f"got {source_power.shape} and {target_power.shape}")
    if s < _MIN_SIZE:
        raise InputError(f"segments must be at least {_MIN_SIZE} x {_MIN_SIZE} pixels, got {s}")
    _, _, centre, counts, *_, ring_sums = _geometry(s, s, min(_N_RINGS, s // 2))
    both = np.stack([source_power, target_power]).reshape(2 * n, -1)
    sums = np.asarray(ring_sums @ both.astype(np.float64, copy=False).T).T.reshape(2, n, centre.size)
    looks = np.asarray(looks, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sums = sums / np.where(looks > 0, looks, np.nan)[:, None]  # means over the segments
    return _measure(sums, centre, counts, s, tol, looks=looks)


def _measure(sums, centre, counts, size, tol, *, floors=(None, None), looks=1.0) -> Sharpness:
    """The measure from the ring sums ``(2, n, rings)`` of the source's and the target's power: their white
    floors (at least ``floors``' where given), the fit, the flags."""
    rings = sums / np.maximum(counts, 1.0)
    # the white floor: the lower of the mean powers in 0.4 <= |f| < 0.5 and in the corners
    near = (centre >= _FLOOR_FROM) & (centre < 0.5)
    corner = np.isfinite(centre) & (centre >= 0.5)
    floor = np.minimum(sums[..., near].sum(axis=2) / counts[near].sum(),
                       sums[..., corner].sum(axis=2) / counts[corner].sum())
    for k, least in enumerate(floors):
        if least is not None:
            floor[k] = np.maximum(floor[k], least)
    floor = np.maximum(floor, np.finfo(np.float64).tiny)
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        ok, k, slope, slope_err, usable = _fit(rings, floor, centre, counts, size, looks)
    scale = FWHM_PER_SIGMA**2 / (4.0 * math.pi**2)
    diff = np.where(ok, -slope * scale, np.nan)
    err = np.where(ok, slope_err * scale, np.nan)
    band = np.where(ok, np.where(usable, centre, 0.0).max(axis=1), 0.0)
    sharper, nearly = direction_flags(diff, err, 1, tolerance=tol)
    direction = np.where(ok, np.sign(np.where(ok, diff, 0.0)), 0).astype(np.int8)
    return Sharpness(width_difference=diff, uncertainty=err, direction=direction,
                     rings=np.where(ok, k, 0), band=band, target_sharper=sharper,
                     nearly_equal=nearly)


def autocorrelation_width_difference(
    source: np.ndarray,
    target: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    weight_sigma: float = 3.0,
) -> np.ndarray:
    """``FWHM_T^2 - FWHM_S^2`` from the autocorrelation peaks (the alternative measure).

    The noise floor (lowest ring beyond ``|f| = 0.4``) is removed from each
    power spectrum, which is transformed back to the autocorrelation; its
    second moment under a round Gaussian weight of ``weight_sigma`` pixels,
    corrected as if the peak were Gaussian, is ``var(scene) + 2 sigma^2``.

    Parameters
    ----------
    source, target, mask
        As for :func:`sharpness`.
    weight_sigma
        Sigma of the weight, pixels.

    Returns
    -------
    numpy.ndarray
        ``(n,)``, pixels squared; NaN where the weighted moment fails.
    """
    both, good, _ = _prepare(source, target, mask, None, None)
    h, w = good.shape[1:]
    taper, index, centre = _geometry(h, w)[:3]
    weight = taper * good
    wsum = weight.sum(axis=(1, 2), dtype=np.float64)
    mean = (both * weight).sum(axis=(2, 3), dtype=np.float64) / np.where(wsum > 0, wsum, 1.0)
    spec = scipy.fft.rfft2((both - mean[..., None, None]) * weight, workers=1)
    power = spec.real.astype(np.float64) ** 2 + spec.imag.astype(np.float64) ** 2
    hi = centre[index] >= _FLOOR_FROM
    floor = np.median(power[..., hi], axis=-1) / math.log(2.0)  # exponential: median = ln 2 mean
    acf = scipy.fft.irfft2(power - floor[..., None, None], s=(h, w), workers=1)
    r = 3 * int(math.ceil(weight_sigma))
    dy = np.arange(-r, r + 1)
    peak = np.roll(np.roll(acf, r, axis=-2), r, axis=-1)[..., :2 * r + 1, :2 * r + 1]
    d2 = (dy[:, None] ** 2 + dy[None, :] ** 2).astype(np.float64)
    gw = np.exp(-0.5 * d2 / weight_sigma**2)
    m0 = (peak * gw).sum(axis=(-2, -1))
    m2 = (peak * gw * d2).sum(axis=(-2, -1)) / np.where(m0 > 0, m0, np.nan) / 2.0
    s2 = weight_sigma**2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(m2 < s2, m2 * s2 / (s2 - m2), np.nan)
    return (var[1] - var[0]) / 2.0 * FWHM_PER_SIGMA**2


def _resolvable(uncertainty: np.ndarray, tolerance: float) -> np.ndarray:
    return np.maximum(tolerance, NEARLY_EQUAL_Z * np.nan_to_num(np.asarray(uncertainty, dtype=np.float64)))


def direction_flags(
    width_difference: np.ndarray,
    uncertainty: np.ndarray,
    direction: np.ndarray | int,
    *,
    tolerance: float = TARGET_SHARPER_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Which kernels sharpen, and which pairs are nearly equal, given the direction each was fitted in.

    ``direction`` ``+1`` (the target fitted: a kernel sharpens where the
    target is sharper, ``width_difference < 0``) or ``-1`` (the source fitted:
    it sharpens where ``width_difference > 0``). Returns boolean arrays
    ``(sharpens, nearly_equal)``: ``sharpens`` where the fitted image is
    sharper by more than ``tolerance`` and ``NEARLY_EQUAL_Z`` uncertainties,
    ``nearly_equal`` where ``|width_difference|`` is within them; neither
    where not measured (NaN).
    """
    diff = np.asarray(width_difference, dtype=np.float64)
    measured = np.isfinite(diff)
    value = np.where(measured, diff, 0.0)
    nearly = measured & (np.abs(value) <= _resolvable(uncertainty, tolerance))
    sharpens = measured & ~nearly & (np.asarray(direction) * value < 0)
    return sharpens, nearly


def image_direction(
    width_difference: np.ndarray,
    uncertainty: np.ndarray,
    *,
    tolerance: float = TARGET_SHARPER_TOLERANCE,
) -> int:
    """The direction of an image from its tiles' measures: ``-1`` (reverse) where more of its tiles have the
    target sharper than the source sharper (beyond ``tolerance`` and ``NEARLY_EQUAL_Z`` uncertainties), else
    ``+1``; a tie is broken by the sign of the median measured difference, and an image with no measured tile
    is forward."""
    diff = np.asarray(width_difference, dtype=np.float64).ravel()
    sharper, _ = direction_flags(diff, np.asarray(uncertainty).ravel(), 1, tolerance=tolerance)
    blurrier, _ = direction_flags(diff, np.asarray(uncertainty).ravel(), -1, tolerance=tolerance)
    n_sharper, n_blurrier = int(np.count_nonzero(sharper)), int(np.count_nonzero(blurrier))
    if n_sharper != n_blurrier:
        return -1 if n_sharper > n_blurrier else 1
    measured = diff[np.isfinite(diff)]
    return -1 if measured.size and np.median(measured) < 0 else 1
