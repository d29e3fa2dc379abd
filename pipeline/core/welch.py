"""Welch-style kernel estimation from overlapping, tapered segments.

Each tile is cut into overlapping ``segment_size x segment_size`` segments.
Every kept segment of the source and of the target has its own mean removed, is
multiplied by a separable taper and Fourier transformed; the cross spectrum
``sum conj(FS) * FR`` and the source auto spectrum ``sum |FS|**2`` are summed
over the tile's kept segments, and the kernel's transform is their regularised
ratio. Averaging over segments tames the noise of the plain ratio, and the taper
suppresses the cross-shaped artifact caused by non-periodic edges.

The taper (``window="auto"``, default) is chosen per tile: the sine taper (the
square root of Hann) where both images show sources on a white-noise sky
(:func:`sky_noise_variance`; both, so that exchanging them changes nothing but
the direction), Hann elsewhere.  Over half-overlapping segments
the sine taper's squares sum to one, so every pixel weighs alike (survey
tiles: relative error 0.057 / 0.073 against Hann's 0.064 / 0.083 on bright and
sparse fields); its spectrum falls off more slowly than Hann's, so a smooth
scene's low frequencies leak into its high ones (a noise-free scene smoothed
over 2 px: 0.20 against 0.024 after the refinement below).  A tile whose
dominant source lies at its edge gets Hann too (:data:`EDGE_SHARE`, below).

Regularisation
--------------
``regularization="auto"`` (default) sets it per tile from the data.  At each
frequency the segments are independent looks at one value of the kernel's
transform, so the spread of the segments' target spectra about their own best
fit measures the noise power there, whatever its spectrum; the strength
``lam`` of a Laplacian (smoothness) penalty minimises the unbiased estimate of
the prediction risk it implies (Mallows' Cp), searched on a log grid, all in
the Fourier domain where the problem is diagonal.  The kernel is the
least-squares solution confined to its stamp (preconditioned conjugate
gradients, not a crop).  A plain Laplacian flattens the peak (FWHM 9 % too
broad on survey tiles), so it then acts on the kernel less a profile:

- on noisy tiles (strength above :data:`REFINE_MAX_LAM`: survey tiles), an
  elliptical Gaussian, or a Moffat profile where that fits the spectra
  better by more than :data:`MOFFAT_GAIN` (:mod:`pipeline.core.profiles`),
  fitted to the spectra by maximum likelihood, every frequency weighed by
  what it knows (:func:`_profile_kernels`); its strength chosen again by the
  risk about the profile, and the kernel given the profile's flux.  The
  adaptive moments of a noisy, smoothed kernel are biased wide (FWHM +10 %
  on faint survey tiles, +31 % on sparse faint ones) and its sum rests on
  the few lowest frequencies; the fitted profile is neither (median relative
  L2 0.137 -> 0.088 and 0.304 -> 0.179, flux 2.5 -> 0.9 % and 4.4 -> 3.3 %
  on 16 faint and sparse faint tiles; Moffat kernels 0.087 -> 0.021 on
  bright tiles);
- elsewhere (photographs) its own Gaussian core (:func:`gaussian_core`,
  from the previous round's adaptive moments; in rounds, each tile until
  its core's width settles to 0.5 %, at most :data:`REFERENCE_ROUNDS`).

Tapering the
segments shrinks the kernel at offset ``d`` by the taper's overlap gain
``a(dy) a(dx)``, ``a(d) = sum w(x) w(x - d) / sum w**2`` (exactly, for a white
source): it is divided out (a fixed ridge gives a shifted delta of height
``a(dy) a(dx)``).  Where a tile's light is a few bright stars the gain is
their own (:func:`source_gains`, from the source's pixels on a white sky): a
star off a segment's centre, or near the tile's edge, weighs one side of the
kernel more than the other (W's tiles: centroids off by 0.065 px at the
median and 0.31 at the 99th percentile with the white gain, 0.012 and 0.047
with their own).  Those gains are exact for a source whose light is
points; a star's light is spread by its PSF, and pixels ``e`` apart of the
same star see ``a(j + e)`` where the division assumed ``a(j) a(e)``: the
kernels came out narrow (width -1.05 % at the median on bright survey tiles,
with a sine taper of 64 and a PSF of FWHM 3 px).  On the profiled tiles that
difference, for the fitted profile and the source's own autocorrelation, is
taken out of the cross spectrum and the profile refitted to what is left
(:func:`taper_bias`: width -0.12 %, relative L2 0.026 -> 0.015 on those
tiles).  Where the source shows sources on a white-noise sky
(:func:`sky_noise_variance`), the source's own noise power is taken out of its
power (errors in variables: it shrank the kernel by 7.6 % on faint tiles);
that leaves the variance of that power, the whole of the profile fit's
first-order bias (its weights ``1 / (sigma2 A)`` cancel the terms of the
signal times the noise), and the refit takes it out of the fit's
quadratic term too (:func:`source_power_spread`; sparse faint survey tiles: width +13
-> +4 %, flux +1.8 -> +0.2 % at the median, 96 tiles) where that first-order
correction leaves two thirds of what the fit knows of the width
(:data:`SPREAD_MOST_KEPT`).  The refit costs 4-9 % of the time.
Where the chosen strength is at most :data:`REFINE_MAX_LAM` (hardly any noise,
as on a photograph), the segments' windowing, which does not commute with the
blur, is the error left (8-bit photo, 15 x 15 kernels: relative L2 0.022 and
0.073 against 0.004 and 0.003 for least squares on the whole tile); there the
kernel is refined by a few iterations of the exact least squares over the
tile's pixels (:func:`_refine`: 0.0036 and 0.0044;
it costs 1.4-1.7 times the automatic part again, on those tiles only).
So is a tile where one bright source at the tile's edge dominates either image
(:data:`EDGE_SHARE`; it is tapered with Hann): its blurred light beyond the
tile is cut off, which no taper gain describes, and the whole tile's least
squares take only what lies inside (W's 16 such tiles of 1,024: relative L2
0.04-0.95, 0.02-0.06 refined). The segments that hold that source (any
pixel within half a kernel of its brightest pixel) are left out of such a
tile's spectra, where half its segments or more remain: the refinement,
which uses every pixel, takes its light from a start the cut-off light did
not bias (the brightest star of W, 5 px from the edge: 0.23 → 0.07).
A number is a fixed ridge instead, ``eps = regularization * mean(power)``.
Measured figures: ``docs/benchmarks.md``.

All tiles of a batch and all their segments are transformed together with
batched real FFTs (float32 when the inputs are float32); the batch is processed
in chunks of tiles so the working memory stays bounded. Segment means are
removed in the Fourier domain, ``F((x - m) w) = F(x w) - m F(w)``, at the few
frequencies where ``F(w)`` is nonzero.

Bad pixels
----------
A segment is 64 x 64 pixels by default, so dropping every segment that
touches a bad pixel loses them all at 0.1 % scattered bad pixels (about 4
per segment).  Instead, isolated bad pixels are filled from their good
neighbours, separately in each image (:func:`pipeline.core.fill.fill_bad_pixels`:
a degree-4 polynomial over the 7 x 7 neighbourhood, mirrored beyond the tile's
edges), and every segment is kept; only segments touching a bad pixel too
clustered to fill (bad blocks, the centre of a saturated blob) are dropped.
Bad in the source (``source_bad``), in the target (``target_bad``) and in
both (``bad``, the user's mask) are filled the same way.

Measured on 16 simulated survey tiles (256 x 256, 21 x 21 Gaussian kernels,
stars and galaxies with Poisson and read noise, the fixed ridge 1e-3), with NaN
at 0.01 / 0.1 / 0.3 % of the source pixels and as many of the target pixels,
plus one bad target column a tile: every tile gives a kernel, all 49
segments are used, and the relative L2 error ``|K - K_true| / |K_true|`` is
that of the clean tiles (0.327) to within 1 % at the median and 4 % on the
worst tile; the flux error stays at 1.3 %, as on the clean tiles.  (Dropping
the touched segments gave a NaN kernel on every tile at 0.1 % and 0.3 %, and
1.6 times the clean error at 0.01 %; down-weighting segments by their number
of filled pixels gave 1.1-1.2 times the clean error.)  Filling costs
1-2 ms per 256 x 256 image that has bad pixels, so such tiles take 1.8-2.2
times as long as clean ones (5.8-7.2 against 3.2 ms, one thread); tiles
without bad pixels are not touched and give bit-identical results.

With ``find_defects`` (default), defects nobody marked are found first
(:mod:`pipeline.core.defects`: saturation plateaus, single-pixel spikes that
the other image does not show) and treated as bad pixels of their image:
0.03 % unflagged hot and dead pixels in each image gave relative L2 0.81 and
a 33 % flux error without it, the clean tiles' 0.33 and 1.2-1.4 % with it.
The search costs about 1 ms a tile.  Cosmic-ray tracks escape it (16 of 130
track pixels a tile found), so each image's spikes are also looked for with
the other image of the pair (:func:`pipeline.core.sharpness.pair_spikes`:
light the other image has not got near by, hot and dead pixels by their
neighbours), about 1.5 ms a tile more.  On 256^2 survey tiles with 0.1 %
unflagged hot and dead pixels in each image and 10 cosmic rays in the
target (kernel 21, 8 tiles, FWHM ratio 1.2 and 1.4): relative L2 0.30 / 0.10
on the sparsest field and 0.12 / 0.08 on the sparse one, against 0.72 / 0.53
and 0.18 / 0.09 without that search, and 0.22 / 0.08 and 0.10 / 0.07 on the
clean tiles (segments touching a track's unfillable core are dropped: 32 of
49 kept).  Clean tiles and the photos lose nothing (no pixel is found; a
tile where more than :data:`~pipeline.core.sharpness.SPIKE_MOST` of the
pixels would be is a texture, not a sky, and none of them is taken).

The measure of which image is sharper (``measure=True``) comes from the
segments' summed power spectra (:func:`pipeline.core.sharpness.spectra_sharpness`):
no transform of its own, and the pixels the kernels are fitted to.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import scipy.fft as sfft
from numpy.lib.stride_tricks import as_strided

from ..errors import InputError, OptionError
from . import profiles
from .defects import TileSkies, find_defects, sky_statistics, tile_skies
from .fill import FILL_RADIUS, fill_bad_pixels
from .gram import fit_region
from .moments import Moments, adaptive_moments
from .options import WelchOptions, parse_window
from .sharpness import MIN_TILE as SHARPNESS_MIN_TILE
from .sharpness import Sharpness, pair_spikes, spectra_sharpness
from .stamps import stamp_lags, stamp_spectra
from .validate import check_odd_size, check_positive_int, either_bad

__all__ = ["WelchResult", "WelchSpectra", "welch_kernels", "taper"]

#: Upper bound on the number of segment pixels transformed at once per image
#: (at least one tile); the working memory per thread is about 25 bytes
#: (float32) or 50 bytes (float64) per segment pixel.
_CHUNK_PIXELS = 1 << 18
#: ``window="auto"``: the second taper on tiles whose images both show sources on a white sky
#: (:func:`sky_noise_variance`: every pixel weighs alike, and a point's spectrum does not leak), else the first.
AUTO_WINDOWS = ("hann", "sine")
#: Tiles where one source holds at least :data:`EDGE_SOURCE_SHARE` of either image's source energy
#: (:func:`source_dominance`) and the tile's outer band (half a kernel wide) at least :data:`EDGE_SHARE` of it
#: are tapered with Hann and refined on the whole tile (:func:`_refine`) whatever their strength: the blurred
#: light of a bright star at the tile's edge is cut off, which no taper gain describes, and the sine taper,
#: which weighs light near the segments' edges more, suffers most (W's 16 such tiles of 1,024: relative L2
#: 0.04-0.95 before, 0.02-0.06 after); the segments that hold the source are left out of their spectra.
EDGE_SOURCE_SHARE = 0.8
EDGE_SHARE = 0.8
#: A taper whose spectrum has at most this many nonzero bins (Hann's: 6 of the half spectrum) has the
#: segments' means removed there; any other has them subtracted from the pixels (one pass more).
_FEW_BINS = 16


@dataclass(frozen=True)
class WelchResult:
    """Kernels estimated by :func:`welch_kernels`.

    Attributes
    ----------
    kernels : numpy.ndarray
        ``(n, k, k)`` float64 kernels, centre at ``(k // 2, k // 2)``; NaN for
        tiles without any usable segment.
    background : numpy.ndarray
        ``(n,)`` float64 constant offset of the target relative to
        ``kernel (*) source``: ``mean(target) - sum(kernel) * mean(source)``
        over the pixels of the kept segments; NaN where the kernel is NaN.
    n_segments : numpy.ndarray
        ``(n,)`` int64 number of segments used per tile.
    lam : numpy.ndarray
        ``(n,)`` float64 dimensionless regularisation strength used: the one
        chosen from the data with ``regularization="auto"``, else
        the fixed ridge factor; NaN where the kernel is NaN.
    at_bound : numpy.ndarray
        ``(n,)`` bool, the automatic choice ended at the largest strength searched.
    """

    kernels: np.ndarray
    background: np.ndarray
    n_segments: np.ndarray
    lam: np.ndarray
    at_bound: np.ndarray
    sharpness: Sharpness | None = None


@dataclass
class WelchSpectra:
    """A batch's segment spectra summed per tile, before the kernels are solved from them.

    From :func:`welch_kernels` with ``spectra_only=True``; :meth:`take` keeps
    some of the tiles, :meth:`solve` gives their :class:`WelchResult`.
    ``sharpness`` is the measure of which image is sharper where asked
    (``measure=True``), else ``None``.
    """

    sources: np.ndarray  # the tiles, bad pixels filled
    targets: np.ndarray
    source_bad: np.ndarray | None  # the pixels filled or dropped in each image (the whole-tile refinement's)
    target_bad: np.ndarray | None
    cross: np.ndarray  # (n, seg, seg // 2 + 1): sum of conj(FS) FR
    power: np.ndarray  # sum of |FS|^2
    target_power: np.ndarray | None  # sum of |FR|^2 (regularization="auto" or a measure)
    sums_s: np.ndarray  # (n, ny + 1, nx + 1): segment sums, whole-tile sums last
    sums_r: np.ndarray
    kept: np.ndarray  # (n, ny, nx): segments used
    sharpness: Sharpness | None
    window_of: np.ndarray  # (n,): each tile's taper, an index into layout.windows
    sky: tuple[np.ndarray, np.ndarray] | None  # (n,) each: the sources' white-sky noise variance (or 0), sky level
    at_edge: np.ndarray  # (n,) bool: one source at the tile's edge dominates (refined on the whole tile)
    layout: _Layout
    kernel_size: int
    opts: WelchOptions
    workers: int
    #: (n, ny, nx): the segments whose pixels the whole-tile refinement uses, where not ``kept`` (the tiles
    #: whose source at the edge was left out of the spectra); ``None``: ``kept``
    fit_kept: np.ndarray | None = None
    #: (n, seg, seg // 2 + 1): sum over the segments of |FS|**2 times the segment's own noise level, and (n,)
    #: the mean level (regularization="auto": the noise where a few segments hold the light)
    weighted_power: np.ndarray | None = None
    mean_level: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> WelchSpectra:
        """The spectra of the tiles ``rows`` (an index array)."""
        def cut(a):
            return None if a is None else a[rows]

        measure = None if self.sharpness is None else Sharpness(**{k: v[rows] for k, v in vars(self.sharpness).items()})
        return replace(self, sources=self.sources[rows], targets=self.targets[rows], source_bad=cut(self.source_bad),
                       target_bad=cut(self.target_bad), cross=self.cross[rows], power=self.power[rows],
                       target_power=cut(self.target_power), sums_s=self.sums_s[rows], sums_r=self.sums_r[rows],
                       kept=self.kept[rows], sharpness=measure, window_of=self.window_of[rows],
                       at_edge=self.at_edge[rows], fit_kept=cut(self.fit_kept),
                       weighted_power=cut(self.weighted_power), mean_level=cut(self.mean_level),
                       sky=None if self.sky is None else (self.sky[0][rows], self.sky[1][rows]))

    def solve(self) -> WelchResult:
        """The kernels of these spectra."""
        return _solve(self)


def taper(window: str | tuple[str, float], size: int) -> np.ndarray:
    """Return the 1-D periodic taper of length ``size``.

    Parameters
    ----------
    window : str or (str, float)
        ``"hann"``, ``"sine"`` (``sqrt`` of Hann), ``"tukey"`` (tapered
        fraction 0.5), ``("tukey", alpha)`` with ``0 <= alpha <= 1``, or
        ``"none"`` (no taper); not ``"auto"``, which is chosen per tile
        (:data:`AUTO_WINDOWS`).
    size : int
        Number of samples.

    Returns
    -------
    numpy.ndarray
        ``(size,)`` float64 window, periodic (DFT-even) form.
    """
    name, param = parse_window(window)
    if name == "auto":
        raise OptionError("window 'auto' is chosen per tile, not one taper; give 'hann', 'sine', 'tukey' or 'none'")
    x = np.arange(size, dtype=np.float64) / size  # periodic: sample n of a size+1 window
    if name == "none":
        return np.ones(size)
    if name == "hann":
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * x)
    if name == "sine":
        return np.sin(np.pi * x)
    alpha = param  # tukey
    w = np.ones(size)
    if alpha > 0.0:
        lo = x < alpha / 2.0
        hi = x > 1.0 - alpha / 2.0
        w[lo] = 0.5 - 0.5 * np.cos(2.0 * np.pi * x[lo] / alpha)
        w[hi] = 0.5 - 0.5 * np.cos(2.0 * np.pi * (1.0 - x[hi]) / alpha)
    return w


def _positions(length: int, size: int, step: int) -> np.ndarray:
    """Segment start offsets along one axis; the last segment ends at the edge."""
    pos = np.arange(0, length - size + 1, step)
    if pos[-1] != length - size:
        pos = np.append(pos, length - size)
    return pos


def _groups(pos: np.ndarray, step: int) -> list[tuple[slice, int, int]]:
    """Split offsets into runs of constant ``step``: ``(slot slice, start, count)``."""
    uniform = pos[0] + step * np.arange(pos.size) == pos
    n_uni = int(np.argmin(uniform)) if not uniform.all() else pos.size
    out = [(slice(0, n_uni), int(pos[0]), n_uni)]
    for i in range(n_uni, pos.size):
        out.append((slice(i, i + 1), int(pos[i]), 1))
    return out


def _selector(pos: np.ndarray, size: int, length: int, dtype: np.dtype) -> np.ndarray:
    """``(len(pos) + 1, length)`` 0/1 matrix: one row per segment plus all-ones."""
    sel = np.zeros((pos.size + 1, length), dtype=dtype)
    idx = pos[:, None] + np.arange(size)
    np.put_along_axis(sel[:-1], idx, 1, axis=1)
    sel[-1] = 1
    return sel


def welch_kernels(
    sources: np.ndarray,
    targets: np.ndarray,
    bad: np.ndarray | None = None,
    *,
    kernel_size: int,
    options: WelchOptions | None = None,
    source_bad: np.ndarray | None = None,
    target_bad: np.ndarray | None = None,
    workers: int = 1,
    measure: bool = False,
    spectra_only: bool = False,
    **option_keywords: Any,
) -> WelchResult | WelchSpectra:
    """Estimate one kernel per tile by Welch-averaged cross/auto spectra.

    Parameters
    ----------
    sources, targets : numpy.ndarray
        ``(n, ty, tx)`` float32 or float64 tiles with
        ``targets ~ kernel (*) sources + background``, finite except at bad
        pixels (whose values are ignored). Transforms run in float32 when
        both are float32, else in float64.
    bad : numpy.ndarray, optional
        ``(n, ty, tx)`` bool, True marks a pixel bad in both images (a user
        mask).
    source_bad, target_bad : numpy.ndarray, optional
        ``(n, ty, tx)`` bool, pixels bad in the source or in the target only.
        Isolated bad pixels are filled from their good neighbours in the image
        where they are bad (both images for ``bad``); segments touching a bad
        pixel too clustered to fill are dropped (see the module notes for the
        measured accuracy).
    kernel_size : int
        Odd kernel side ``k <= segment_size``.
    options : WelchOptions, optional
        :class:`~pipeline.core.options.WelchOptions` (segment_size, overlap,
        window, regularization); keyword options (``segment_size=32``, ...)
        are applied on top.  The ridge ``eps = regularization * mean(power)``
        is taken over all ``segment_size**2`` frequencies of the tile's summed
        source power (equal, by Parseval, to the summed energy of its tapered,
        mean-removed source segments).
    workers : int
        Number of threads. Chunks of tiles are processed concurrently, each
        with single-threaded :mod:`scipy.fft` transforms; a batch that fits in
        one chunk passes ``workers`` to :mod:`scipy.fft` instead.
    measure
        Also measure which image of each tile is sharper from the segments'
        power spectra (:func:`pipeline.core.sharpness.spectra_sharpness`),
        as :attr:`WelchResult.sharpness`.
    spectra_only
        Stop at the averaged spectra: return the :class:`WelchSpectra`
        (kernels from :meth:`WelchSpectra.solve`).

    Returns
    -------
    WelchResult
        Kernels, background offsets and number of segments used per tile; a
        tile none of whose segments is usable has NaN kernel and background
        and ``n_segments == 0``.
    """
    opts = WelchOptions.resolve(options, option_keywords)
    kernel_size = check_odd_size("kernel_size", kernel_size)
    if kernel_size > opts.segment_size:
        raise OptionError(f"kernel_size {kernel_size} exceeds segment_size {opts.segment_size}")
    workers = check_positive_int("workers", workers)
    sources = np.asarray(sources)
    targets = np.asarray(targets)
    if sources.ndim != 3 or sources.shape != targets.shape:
        raise InputError(
            f"sources and targets must be (n, ty, tx) of one shape, got {sources.shape} and {targets.shape}"
        )
    maps = {}
    for name, m in (("bad", bad), ("source_bad", source_bad), ("target_bad", target_bad)):
        if m is not None:
            m = np.asarray(m, dtype=bool)
            if m.shape != sources.shape:
                raise InputError(f"{name} must have shape {sources.shape}, got {m.shape}")
            maps[name] = m
    ty, tx = sources.shape[1:]
    if opts.segment_size > min(ty, tx):
        raise OptionError(f"segment_size {opts.segment_size} exceeds the tile size {(ty, tx)}")
    src_bad = either_bad(maps.get("bad"), maps.get("source_bad"))
    tgt_bad = either_bad(maps.get("bad"), maps.get("target_bad"))
    auto_window = parse_window(opts.window)[0] == "auto"
    skies = (None, None)  # each image's sky, measured once for the defect searches and the noise
    if (opts.find_defects or auto_window or opts.auto_regularization) and sources.dtype == targets.dtype and \
            sources.dtype in (np.float32, np.float64):
        with np.errstate(invalid="ignore", over="ignore"):  # (as the defect search measures them)
            skies = (tile_skies(sources, None if src_bad is None else ~src_bad),
                     tile_skies(targets, None if tgt_bad is None else ~tgt_bad))
    if opts.find_defects:
        src_bad, tgt_bad = (_with_found_defects(sources, src_bad, targets, tgt_bad, skies[0]),
                            _with_found_defects(targets, tgt_bad, sources, src_bad, skies[1]))
        src_bad, tgt_bad = _with_spikes(sources, src_bad, targets, tgt_bad, skies)
    sources, targets, unusable = _fill_isolated(sources, targets, src_bad, tgt_bad)
    n = len(sources)
    sky, windows, window_of = None, (opts.window,), np.zeros(n, dtype=np.int8)
    at_edge = np.zeros(n, dtype=bool)
    spare = None  # the pixels about each tile's source at the edge: their segments are left out of the spectra
    if auto_window or opts.auto_regularization:
        sky, target_sky = _sky_noise(sources, skies[0]), _sky_noise(targets, skies[1])
        # either image's source at the edge: exchanging the images changes neither choice
        for images, (noise_var, level) in ((sources, sky), (targets, target_sky)):
            share, edge, brightest = _dominance(images, level, noise_var, kernel_size=kernel_size)
            ruled = (share >= EDGE_SOURCE_SHARE) & (edge >= EDGE_SHARE)
            at_edge |= ruled
            if ruled.any():
                spare = _about(brightest, np.flatnonzero(ruled), kernel_size // 2, images.shape, spare)
        if auto_window:  # the sine taper where both images are sources on a white sky, but for a source at the edge
            windows = AUTO_WINDOWS
            window_of = ((sky[0] > 0) & (target_sky[0] > 0) & ~at_edge).astype(np.int8)
    spectra = _spectra(sources, targets, unusable, kernel_size=kernel_size, opts=opts, workers=workers,
                       source_bad=src_bad, target_bad=tgt_bad, measure=measure, windows=windows,
                       window_of=window_of, sky=sky, at_edge=at_edge, spare=spare)
    return spectra if spectra_only else _solve(spectra)


def _with_found_defects(images: np.ndarray, bad: np.ndarray | None, others: np.ndarray,
                        others_bad: np.ndarray | None, skies: TileSkies | None = None) -> np.ndarray | None:
    """``bad`` with the spikes and saturation plateaus found in each image added (``None`` if none).

    ``others`` are the other images of the pairs (a spike has no counterpart there); ``skies``: the
    images' :func:`~pipeline.core.defects.tile_skies` with ``bad``, where measured.
    """
    found = find_defects(images, None if bad is None else ~bad, others,
                         None if others_bad is None else ~others_bad, skies=skies)
    if not found.any():
        return bad
    return found if bad is None else bad | found


def _with_spikes(sources: np.ndarray, source_bad: np.ndarray | None, targets: np.ndarray,
                 target_bad: np.ndarray | None, skies: tuple[TileSkies | None, TileSkies | None] = (None, None)
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``source_bad`` and ``target_bad`` with each image's spikes added: hot and dead pixels, and light the
    other image has not got (cosmic-ray tracks; :func:`pipeline.core.sharpness.pair_spikes`; ``skies``: the
    images' skies, where measured)."""
    if min(sources.shape[1:]) < SHARPNESS_MIN_TILE:
        return source_bad, target_bad
    found = pair_spikes(sources, targets, source_bad, target_bad, skies=None if skies[0] is None else skies)
    out = []
    for bad, new in zip((source_bad, target_bad), found):
        if new.any():
            bad = new if bad is None else bad | new
        out.append(bad)
    return out[0], out[1]


def _fill_isolated(
    sources: np.ndarray,
    targets: np.ndarray,
    source_bad: np.ndarray | None,
    target_bad: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Fill the isolated bad pixels of each image; return the pixels left unfillable.

    Returns ``(sources, targets, unfillable)``: copies with the fillable bad
    pixels replaced and the unfillable ones zeroed (the inputs are never
    written; arrays without bad pixels are returned as they are, and the
    copies keep the inputs' dtype), and the ``(n, ty, tx)`` bool map of the
    pixels left unfilled in either image, ``None`` when there is none.
    """
    if source_bad is None and target_bad is None:
        return sources, targets, None
    unusable = np.zeros(sources.shape, dtype=bool)
    out = []
    for images, bad in ((sources, source_bad), (targets, target_bad)):
        if bad is None or not bad.any():
            out.append(images)
            continue
        images = images.copy()
        r = FILL_RADIUS
        for i in np.nonzero(bad.reshape(len(bad), -1).any(axis=1))[0]:
            # mirrored beyond the tile's edges, so edge pixels have whole neighbourhoods
            filled, unfillable = fill_bad_pixels(np.pad(images[i], r, mode="reflect"),
                                                 np.pad(bad[i], r, mode="reflect"))
            images[i] = filled[r:-r, r:-r]
            unusable[i] |= unfillable[r:-r, r:-r]
        out.append(images)
    return out[0], out[1], unusable if unusable.any() else None


@dataclass(frozen=True)
class _Layout:
    """The segments of a tile: where they lie, their taper, and the half spectrum's Parseval weights."""

    seg: int
    step: int
    windows: tuple[np.ndarray, ...]  # the 1-D tapers; WelchSpectra.window_of indexes them
    colw: np.ndarray
    sel_y: np.ndarray  # (ny + 1, ty): one row per segment, then all ones
    sel_xt: np.ndarray  # (tx, nx + 1)
    nseg: int


def _spectra(
    sources: np.ndarray,
    targets: np.ndarray,
    drop: np.ndarray | None,
    *,
    kernel_size: int,
    opts: WelchOptions,
    workers: int,
    source_bad: np.ndarray | None = None,
    target_bad: np.ndarray | None = None,
    measure: bool = False,
    windows: tuple,
    window_of: np.ndarray,
    sky: tuple[np.ndarray, np.ndarray] | None,
    at_edge: np.ndarray,
    spare: np.ndarray | None = None,
) -> WelchSpectra:
    """The segment spectra of finite tiles, summed per tile; segments touching a ``drop`` pixel are left out.

    Tile ``i`` is tapered by ``windows[window_of[i]]``; ``sky`` is :func:`_sky_noise` of the sources (needed
    with ``regularization="auto"``); ``at_edge`` marks the tiles refined on the whole tile whatever their
    strength (:data:`EDGE_SHARE`).  ``source_bad`` and ``target_bad`` (the pixels filled or dropped in each
    image) are left out of the full-tile refinement, but for the source's filled pixels in a tile refined
    for its source at the edge alone (there each left out would take a whole stamp of target pixels with it).
    Segments touching a ``spare`` pixel are left out of the spectra too (not of the refinement), in the tiles
    where half their segments or more remain.
    """
    n, ty, tx = sources.shape
    seg, overlap = opts.segment_size, opts.overlap
    tapers = tuple(taper(w, seg) for w in windows)
    present = np.unique(window_of)
    win1 = tapers[int(present[0])] if present.size == 1 else None  # one taper for the whole batch

    single = sources.dtype == np.float32 and targets.dtype == np.float32
    wdt = np.dtype(np.float32 if single else np.float64)
    step = max(1, int(round(seg * (1.0 - overlap))))
    py, px = _positions(ty, seg, step), _positions(tx, seg, step)
    ny, nx = py.size, px.size
    nseg = ny * nx
    gy, gx = _groups(py, step), _groups(px, step)
    sel_y = _selector(py, seg, ty, wdt)  # (ny + 1, ty)
    sel_xt = _selector(px, seg, tx, wdt).T.copy()  # (tx, nx + 1)
    win2s = np.stack([np.outer(w, w) for w in tapers]).astype(wdt)
    # Spectrum of the taper: removing a segment's mean m is F((x - m) w) =
    # F(x w) - m F(w); only the bins where F(w) is nonzero need the correction.
    # A taper whose spectrum is not that compact (the sine taper's is nowhere
    # zero), or tapers that differ between tiles, have the means taken from the
    # segments' pixels instead.
    in_pixels = True
    if win1 is not None:
        wspec = sfft.rfft2(np.outer(win1, win1))
        wy, wx = np.nonzero(np.abs(wspec) > 1e-12 * np.abs(wspec).max())
        in_pixels = wy.size > _FEW_BINS
        wvals = wspec[wy, wx].astype(np.complex64 if single else np.complex128)
        wvals_conj = wvals.conj()
    half = seg // 2 + 1
    # Parseval weights of the half spectrum (columns 1..ceil(seg/2)-1 count twice).
    colw = np.full(half, 2.0)
    colw[0] = 1.0
    if seg % 2 == 0:
        colw[-1] = 1.0

    cdt = np.complex64 if single else np.complex128
    cross = np.empty((n, seg, half), dtype=cdt)
    power = np.empty((n, seg, half), dtype=wdt)
    tpower = np.empty((n, seg, half), dtype=wdt) if opts.auto_regularization or measure else None
    # each segment's source power weighted by its own noise level (its target's mean power from NOISE_FROM
    # cycles a pixel across, where a blurred image holds noise alone), and each tile's mean level
    weighted = np.empty((n, seg, half), dtype=np.float64) if opts.auto_regularization else None
    mean_level = None if weighted is None else np.zeros(n)
    high = int(np.ceil(NOISE_FROM * seg))  # the columns |fx| >= NOISE_FROM of the half spectra
    sums_s = np.empty((n, ny + 1, nx + 1), dtype=wdt)
    sums_r = np.empty_like(sums_s)
    if drop is None:
        kept = np.ones((n, ny, nx), dtype=bool)
    else:
        kept = (sel_y[:-1] @ drop.astype(wdt) @ sel_xt[:, :-1]) == 0
    fit_kept = None
    if spare is not None:
        rows = np.flatnonzero(spare.any(axis=(1, 2)))
        spared = kept[rows] & ((sel_y[:-1] @ spare[rows].astype(wdt) @ sel_xt[:, :-1]) == 0)
        enough = spared.sum(axis=(1, 2)) >= max(1, nseg // 2)
        if enough.any():
            fit_kept = kept.copy()
            kept[rows[enough]] = spared[enough]
    inv_area = 1.0 / (seg * seg)
    chunk = max(1, _CHUNK_PIXELS // (nseg * seg * seg))

    def accumulate(lo: int, hi: int, fft_workers: int) -> None:
        """Fill ``cross``, ``power`` and the segment sums of tiles ``lo:hi``."""
        buf_s = np.empty((min(chunk, hi - lo), ny, nx, seg, seg), dtype=wdt)
        buf_r = np.empty_like(buf_s)
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            c = b - a
            src, tgt = sources[a:b], targets[a:b]
            # Segment sums (whole-tile sums in the last row/column) by two products.
            np.matmul(sel_y @ src.astype(wdt, copy=False), sel_xt, out=sums_s[a:b])
            np.matmul(sel_y @ tgt.astype(wdt, copy=False), sel_xt, out=sums_r[a:b])
            # Conjugated source spectra come straight from the transform.
            mean_s, mean_r = (sums[a:b, :-1, :-1] * inv_area for sums in (sums_s, sums_r))
            win2 = win2s[window_of[a]] if win1 is not None else win2s[window_of[a:b]]
            fs = _tapered_spectra(src, buf_s[:c], gy, gx, step, win2, fft_workers, conj=True,
                                  means=mean_s if in_pixels else None)
            fr = _tapered_spectra(tgt, buf_r[:c], gy, gx, step, win2, fft_workers, means=mean_r if in_pixels else None)
            if not in_pixels:
                fs[..., wy, wx] -= mean_s[..., None] * wvals_conj
                fr[..., wy, wx] -= mean_r[..., None] * wvals
            gone = ~kept[a:b]
            if gone.any():
                fs[gone] = 0
                fr[gone] = 0
            fs = fs.reshape(c, nseg, seg * half)
            fr = fr.reshape(c, nseg, seg * half)
            fsv = fs.view(wdt)
            if weighted is None:
                sq = np.einsum("tsk,tsk->tk", fsv, fsv)
                np.add(sq[:, 0::2], sq[:, 1::2], out=power[a:b].reshape(c, -1))
            else:  # the power and the noise-weighted power by one product
                strip = fr.reshape(c, nseg, seg, half)[..., high:].view(wdt)
                level = np.einsum("tsyk,tsyk->ts", strip, strip) / strip[0, 0].size  # (c, nseg); 0 if dropped
                both = np.stack([np.ones_like(level), level], axis=1).astype(wdt) @ (fsv * fsv)
                np.add(both[:, 0, 0::2], both[:, 0, 1::2], out=power[a:b].reshape(c, -1))
                weighted[a:b].reshape(c, -1)[:] = both[:, 1, 0::2] + both[:, 1, 1::2]
                mean_level[a:b] = level.sum(axis=1) / np.maximum((~gone).reshape(c, -1).sum(axis=1), 1)
            if tpower is not None:
                frv = fr.view(wdt)
                sq = np.einsum("tsk,tsk->tk", frv, frv)
                np.add(sq[:, 0::2], sq[:, 1::2], out=tpower[a:b].reshape(c, -1))
            # Sum over segments of conj(FS) * FR, in place.
            np.multiply(fs, fr, out=fs)
            np.add.reduce(fs, axis=1, out=cross[a:b].reshape(c, -1))

    # Contiguous runs of whole chunks, one per thread, written to disjoint slices.
    n_chunks = -(-n // chunk)
    threads = max(1, min(workers, n_chunks))
    _in_threads(accumulate, [min(n, chunk * (n_chunks * i // threads)) for i in range(threads + 1)], workers)

    layout = _Layout(seg=seg, step=step, windows=tapers, colw=colw, sel_y=sel_y, sel_xt=sel_xt, nseg=nseg)
    sharp = None
    if measure:
        sharp = spectra_sharpness(power, tpower, kept.sum(axis=(1, 2)))
    return WelchSpectra(sources=sources, targets=targets, source_bad=source_bad, target_bad=target_bad, cross=cross,
                        power=power, target_power=tpower, sums_s=sums_s, sums_r=sums_r, kept=kept, sharpness=sharp,
                        window_of=window_of, sky=sky, layout=layout, kernel_size=kernel_size, opts=opts,
                        at_edge=at_edge, workers=workers, fit_kept=fit_kept, weighted_power=weighted,
                        mean_level=mean_level)


def _solve(sp: WelchSpectra) -> WelchResult:
    """The kernels of the spectra ``sp``."""
    sources, targets, source_bad, target_bad = sp.sources, sp.targets, sp.source_bad, sp.target_bad
    cross, power, tpower, sums_s, sums_r, kept = sp.cross, sp.power, sp.target_power, sp.sums_s, sp.sums_r, sp.kept
    lay, kernel_size, workers = sp.layout, sp.kernel_size, sp.workers
    seg, step, colw, sel_y, sel_xt, nseg = lay.seg, lay.step, lay.colw, lay.sel_y, lay.sel_xt, lay.nseg
    n, ty, tx = sources.shape
    wdt = power.dtype
    regularization = sp.opts.regularization
    used = kept.sum(axis=(1, 2))
    crop = (np.arange(kernel_size) - kernel_size // 2) % seg
    if n == 0:
        empty = np.zeros(0)
        return WelchResult(kernels=np.zeros((0, kernel_size, kernel_size)), background=empty,
                           n_segments=np.zeros(0, dtype=np.int64), lam=empty, at_bound=np.zeros(0, dtype=bool),
                           sharpness=sp.sharpness)

    if sp.opts.auto_regularization:
        noise_var, level = sp.sky
        squares = np.array([float((np.outer(w, w) ** 2).sum()) for w in lay.windows])
        floor = used * noise_var * squares[sp.window_of]

        fraction = np.array([independent_fraction(w, step) for w in lay.windows])[sp.window_of]
        spread = np.zeros(n)  # the variance of the source noise's power, each tile's kept segments together
        starts = _positions(ty, seg, step), _positions(tx, seg, step)
        for j, w in enumerate(lay.windows):
            tiles = np.flatnonzero(sp.window_of == j)
            spread[tiles] = source_power_spread(floor[tiles], kept[tiles], w, *starts)
        # tapering shrinks a kernel at offset d by a(dy) a(dx) for a white source ...
        lags = np.stack([np.outer(g, g) for g in (lag_gain(w) for w in lay.windows)])
        white = np.ascontiguousarray(lags[:, crop[:, None], crop[None, :]])

        def solve(lo: int, hi: int, fft_workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            part = slice(lo, hi)
            of = sp.window_of[part]
            gains = white[of]
            for j in np.unique(of):  # ... by each tile's own where its light is known (sources on a white sky)
                rows = np.flatnonzero(of == j)
                tiles = part if rows.size == hi - lo else lo + rows  # (a slice: no copy of the sources)
                own = source_gains(sources[tiles], level[tiles], noise_var[tiles], kept[tiles], win1=lay.windows[j],
                                   step=step, kernel_size=kernel_size)
                gains[rows] = np.where(np.isfinite(own), own, white[j])
            kern, lam_, bound, pen, reference = _auto_kernels(
                cross[part], power[part], tpower[part], used[part], floor[part], colw=colw, fraction=fraction[part],
                gains=gains, lags=lags, window_of=of, spread=spread[part], refit=~sp.at_edge[part],
                kernel_size=kernel_size, workers=fft_workers,
                unevenness=None if sp.weighted_power is None else _unevenness(sp, part))
            if REFINE_ITERATIONS:
                ok = np.nonzero((used[part] > 0) & ((lam_ <= REFINE_MAX_LAM) | sp.at_edge[part]))[0]
                if ok.size:
                    energy = (power[part][ok].astype(np.float64) * colw).sum(axis=(1, 2)) / (seg * seg)
                    sbad, tbad = (None if m is None else m[lo:hi][ok] for m in (source_bad, target_bad))
                    if sbad is not None:  # the source's filled pixels stay in a noisy tile refined for its edge
                        sbad = sbad & (lam_[ok] <= REFINE_MAX_LAM)[:, None, None]
                    held = (kept if sp.fit_kept is None else sp.fit_kept)[lo:hi][ok]
                    some = held.sum(axis=(1, 2)) < nseg
                    if some.any():  # only the pixels of the kept segments (those of a source at the edge too)
                        out = np.zeros((ok.size, ty, tx), dtype=bool)
                        out[some] = (sel_y[:-1].T @ held[some].astype(wdt) @ sel_xt[:, :-1].T) == 0
                        sbad, tbad = (out if m is None else m | out for m in (sbad, tbad))
                    kern[ok] = _refine(sources[lo:hi][ok], targets[lo:hi][ok], kern[ok], pen[ok], energy,
                                       sbad, tbad, workers=fft_workers, reference=reference[ok])
            return kern, lam_, bound

        # each tile's solution is its own: contiguous parts of the batch
        parts = max(1, min(workers, n))
        done = _in_threads(solve, [n * i // parts for i in range(parts + 1)], workers)
        kernels, lam, at_bound = (np.concatenate(x) for x in zip(*done))
    else:
        # Division and inverse transform in the working precision.
        eps = regularization * (power @ colw.astype(wdt)).sum(axis=1, dtype=np.float64) / (seg * seg)
        denom = power + eps.astype(wdt)[:, None, None]
        ratio = np.divide(cross, denom, out=np.zeros_like(cross), where=denom > 0)
        full = sfft.irfft2(ratio, s=(seg, seg), workers=workers, overwrite_x=True)
        kernels = full[:, crop][:, :, crop].astype(np.float64)
        lam, at_bound = np.full(n, float(regularization)), np.zeros(n, dtype=bool)

    ksum = kernels.sum(axis=(1, 2))
    mean_s = sums_s[:, -1, -1].astype(np.float64) / (ty * tx)
    mean_r = sums_r[:, -1, -1].astype(np.float64) / (ty * tx)
    partial = np.nonzero((used > 0) & (used < nseg))[0]
    if partial.size:
        cover = (sel_y[:-1].T @ kept[partial].astype(wdt) @ sel_xt[:, :-1].T) > 0
        count = cover.sum(axis=(1, 2))
        mean_s[partial] = np.where(cover, sources[partial], 0).sum(axis=(1, 2), dtype=np.float64) / count
        mean_r[partial] = np.where(cover, targets[partial], 0).sum(axis=(1, 2), dtype=np.float64) / count
    background = mean_r - ksum * mean_s
    none = used == 0
    kernels[none] = np.nan
    background[none] = np.nan
    lam[none] = np.nan
    at_bound[none] = False

    return WelchResult(kernels=kernels, background=background, n_segments=used.astype(np.int64),
                       lam=lam, at_bound=at_bound, sharpness=sp.sharpness)


def _in_threads(func: Any, bounds: list[int], workers: int) -> list[Any]:
    """``func(lo, hi, fft_workers)`` over the runs between consecutive ``bounds``, in order.

    One run is done here with ``workers`` for the transforms; more run in a
    thread each, with one-threaded transforms.
    """
    runs = list(itertools.pairwise(bounds))
    if len(runs) == 1:
        return [func(*runs[0], workers)]
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        return list(pool.map(lambda run: func(*run, 1), runs))


def _tapered_spectra(
    tiles: np.ndarray,
    buf: np.ndarray,
    gy: list[tuple[slice, int, int]],
    gx: list[tuple[slice, int, int]],
    step: int,
    win2: np.ndarray,
    workers: int,
    *,
    conj: bool = False,
    means: np.ndarray | None = None,
) -> np.ndarray:
    """Half spectra ``(c, ny, nx, L, L // 2 + 1)`` of the tapered segments.

    With ``conj`` the complex conjugate spectra are returned (same cost).

    Segments are copied from strided views of ``tiles`` into ``buf`` and
    multiplied by the taper there (``win2``: ``(L, L)``, or ``(c, L, L)``, one a
    tile); ``means`` ``(c, ny, nx)``, where given, are subtracted from them first.
    """
    c = tiles.shape[0]
    seg = win2.shape[-1]
    s0, s1, s2 = tiles.strides
    for sy, y0, cy in gy:
        for sx, x0, cx in gx:
            base = tiles[:, y0:, x0:]
            view = as_strided(
                base,
                shape=(c, cy, cx, seg, seg),
                strides=(s0, step * s1, step * s2, s1, s2),
                writeable=False,
            )
            if means is None:
                np.copyto(buf[:, sy, sx], view)
            else:  # the segments' means off as they are copied
                np.subtract(view, means[:, sy, sx, None, None], out=buf[:, sy, sx])
    if win2.ndim == 3:
        np.multiply(buf, win2[:, None, None], out=buf)
    else:
        flat = buf.reshape(-1, seg * seg)
        np.multiply(flat, win2.reshape(-1), out=flat)
    if conj:
        return sfft.ihfft2(buf, norm="forward", workers=workers, overwrite_x=True)
    return sfft.rfft2(buf, workers=workers, overwrite_x=True)


#: The dimensionless strengths ``regularization="auto"`` chooses among:
#: every fourth first, then the three either side of the best of those.
LAM_GRID = np.logspace(-6.0, 2.0, 33)
#: The strengths the risk about a fitted profile chooses among (:func:`_profile_kernels`): the same steps,
#: on to 1e6.  Where the profile describes the kernel its risk keeps falling past 1e2, where
#: :data:`LAM_GRID` stops (median relative L2 of 32 tiles a field, bright / faint / sparse / sparse faint:
#: the survey's Gaussian kernels 0.0150 / 0.0776 / 0.0511 / 0.1942 -> 0.0109 / 0.0569 / 0.0380 / 0.1715; a
#: Moffat kernel's 0.0185 / 0.0790 / 0.0383 / 0.2254 -> 0.0151 / 0.0585 / 0.0279 / 0.1994); where it does
#: not (a core and wide wing, a sharp-core PSF-matching kernel), the kernels move by 2 % at most, or
#: improve.  Up to 1e4: most of that (0.0110 / 0.0583 / 0.0386 / 0.1777).
PROFILE_LAM_GRID = np.logspace(-6.0, 6.0, 49)
#: A sky is white noise where its pixels scatter by less than this many times their noise
#: (:func:`sky_noise_variance`) ...
WHITE_RATIO = 1.5
#: ... and it has sources where at least this many pixels stand 5 sigma above it with a 4-neighbour 3 sigma
#: above it (white noise alone: one in 1e9 pixels; lone bright pixels are not sources).
SOURCE_PIXELS = 5
#: The source pixels whose light :func:`source_gains` weighs: those this many noise sigmas above the sky
#: (2 and 3 gave centroids 0.084 and 0.097 px on faint, sparse survey tiles, all pixels less their noise 0.102).
SOURCE_SIGMAS = 2.0
#: The source power the noise correction leaves at least, as a fraction of the power measured (and its square
#: in the profile refit, :func:`source_power_spread`, as a fraction of the square).
SIGNAL_FLOOR = 0.1
#: At most this many rounds of smoothing towards the Gaussian core of the previous round's kernel
#: (:func:`gaussian_core`), each of this many conjugate-gradient iterations from the previous round's
#: kernel; a tile stops when its core's width changed by at most this fraction.
REFERENCE_ROUNDS = 10
REFERENCE_ITERATIONS = 2
REFERENCE_TOLERANCE = 0.005
#: The tolerance of the core's adaptive moments (a core this close is as good a reference, and the rounds
#: stop on a width change of :data:`REFERENCE_TOLERANCE`).
CORE_TOLERANCE = 1e-3
#: Levenberg-Marquardt iterations of the profile fits (:func:`_profile_kernels`): the Gaussian's (0: no
#: profile, every tile smoothed towards its Gaussian core in rounds), then the Moffat profile's from it, with
#: ``nu = 1 / beta`` starting at :data:`MOFFAT_START_NU` ...
PROFILE_ITERATIONS = 4
MOFFAT_ITERATIONS = 6
MOFFAT_START_NU = 0.05
#: ... which is kept where it lowers the misfit (a chi-squared over the complex frequencies: about 0.5 from
#: the noise alone) by more than this.  Less took a Moffat profile for misfits that were not noise (a
#: Gaussian kernel's tile with an unfillable block: 0.055 -> 0.138 at 4); more lost Moffat kernels' faint
#: tiles (0.086 -> 0.097 at 25).
MOFFAT_GAIN = 10.0
#: The Moffat profile is fitted only where one Gauss-Newton step from the Gaussian predicts at least this
#: fraction of :data:`MOFFAT_GAIN` (:func:`~pipeline.core.profiles.moffat_gain`).
MOFFAT_PROMISE = 0.25
#: The profile fit's noise per frequency is at least this fraction of the tile's median (a noise-free
#: image's "noise" is the taper's misfit; a few frequencies of it would rule the fit: 0.49 -> 0.012).
PROFILE_NOISE_FLOOR = 0.1
#: Levenberg-Marquardt iterations refitting the profile to the spectra corrected for the chosen profile: the
#: taper's bias for it out of the cross spectrum (:func:`taper_bias`), the source noise's power's variance
#: out of the fit's quadratic term (:func:`source_power_spread`); 0: no refit, neither correction.
REFIT_ITERATIONS = 1
#: ... where the source noise's correction leaves at least this share of the fit's information on the
#: profile's width (its quadratic term weighed by ``|L(f)|**2 |H|**2``, ``L`` the Laplacian): a first-order
#: correction that would take more is not to be trusted (the sparse faint survey tiles whose relative error
#: it took from 0.33-0.47 to 0.75-1.8 kept 0.42-0.53 of it).
SPREAD_MOST_KEPT = 2.0 / 3.0
#: Conjugate-gradient iterations of the solve smoothed towards the profile, from the profile.
PROFILE_CG_ITERATIONS = 4
#: Preconditioned conjugate-gradient iterations of the stamp-confined solve the rounds start from (they go on
#: iterating: 2-8 of them gave the same kernels to 4 digits on the survey fields and the photos).
CG_ITERATIONS = 4
#: Conjugate-gradient iterations of the full-tile refinement (:func:`_refine`; 0: none) ...
REFINE_ITERATIONS = 8
#: ... done on the tiles whose chosen strength is at most this: hardly any noise, so the taper's misfit
#: dominates (the 8-bit photo: 2e-5-0.02; survey tiles: 0.1 and above).
REFINE_MAX_LAM = 0.02
#: Each segment's noise level is its target's mean power at horizontal frequencies of this many cycles a pixel
#: and beyond (a kernel of FWHM 2 px or more leaves a blurred image nothing but noise there).
NOISE_FROM = 0.4
#: Conjugate-gradient iterations of each application of the refinement's preconditioner.
REFINE_PRECONDITIONER_ITERATIONS = 4


def laplacian_power(seg: int) -> np.ndarray:
    """``|L(f)|**2`` of the 5-point Laplacian on the ``(seg, seg // 2 + 1)`` half spectrum."""
    cy = np.cos(2.0 * np.pi * sfft.fftfreq(seg))[:, None]
    cx = np.cos(2.0 * np.pi * sfft.rfftfreq(seg))[None, :]
    return (4.0 - 2.0 * cy - 2.0 * cx) ** 2


def independent_fraction(window: np.ndarray, step: int) -> float:
    """Welch's equivalent number of independent segments per segment along one axis.

    ``1 / (1 + 2 sum_k rho(k step)**2)`` with ``rho(d) = sum w(x) w(x - d) / sum w**2``
    the taper's overlap correlation at the offsets of the other segments.
    """
    full = np.correlate(window, window, mode="full")
    mid = window.size - 1
    lags = np.arange(step, window.size, step)
    rho = full[mid + lags] / full[mid]
    return float(1.0 / (1.0 + 2.0 * (rho ** 2).sum()))


def lag_gain(window: np.ndarray) -> np.ndarray:
    """Circular ``a(d) = sum_x w(x) w(x - d mod L) / sum w**2`` of a taper, lags ``0 .. L - 1``.

    What tapering the segments multiplies their correlations by at lag ``d``
    (for a stationary signal), and so a kernel estimated from a white source
    at offset ``d`` (per axis).
    """
    spectrum = np.abs(np.fft.rfft(window)) ** 2
    out = np.fft.irfft(spectrum, n=window.size)
    return out / out[0]


def source_gains(sources: np.ndarray, level: np.ndarray, noise_var: np.ndarray, kept: np.ndarray, *,
                 win1: np.ndarray, step: int, kernel_size: int) -> np.ndarray:
    """The taper's gain at each kernel offset for each tile's own sources, ``(n, k, k)``; NaN off a white sky.

    A source pixel ``p`` of energy ``e(p)`` (its squared height above ``level``
    where that is over :data:`SOURCE_SIGMAS` times the noise, ``sqrt(noise_var)``;
    else 0: the noise's own energy is flat and would only add noise to the sums) adds ``e(p) w(p) w(p + d)``
    to the segments' correlation at offset ``d`` (summed over the kept
    segments that hold both ``p`` and ``p + d``) and ``e(p) w(p)**2`` to its
    power, so the kernel comes out as the truth times the ratio of the two
    sums (1 at ``d = 0``).  For light spread evenly this is :func:`lag_gain`;
    where a few bright stars dominate a tile it is not: Hann's squares over
    half-overlapping segments swing between 1/2 and 1, so a star off a
    segment's centre weighs one side of the kernel more than the other, and
    near the tile's edge only one segment's rising half holds a star, and its
    light beyond the tile is lost.  Tiles without ``noise_var`` (no white sky:
    a photograph, a smooth scene, whose light is not a set of points) get NaN,
    as do those whose sums are not positive and finite.
    """
    n, ty, tx = sources.shape
    k, seg = kernel_size, win1.size
    out = np.full((n, k, k), np.nan)
    sky = np.flatnonzero(noise_var > 0)
    if not sky.size:
        return out
    # (pixels no kept segment holds may be NaN: the sums below never take them)
    energy = _source_heights(sources, level, noise_var, sky)
    energy *= energy
    dtype = energy.dtype
    reach = np.arange(seg)[:, None] + (np.arange(k) - k // 2)[None, :]  # p + d within the segment
    pairs = np.where((reach >= 0) & (reach < seg), win1[:, None] * win1[np.clip(reach, 0, seg - 1)], 0.0)
    py, px = _positions(ty, seg, step), _positions(tx, seg, step)
    held = kept[sky]
    sums = np.empty((sky.size, k, k))
    whole = held.all(axis=(1, 2))
    if whole.any():  # every segment kept: one product with the pairs of every segment placed on the tile
        on_y, on_x = (_placed(pairs.T, starts, length).astype(dtype) for starts, length in ((py, ty), (px, tx)))
        picked = energy if whole.all() else energy[whole]
        sums[whole] = on_y @ picked @ on_x.T
    for i in np.flatnonzero(~whole):  # the kept segments' energy stacked, then the same product
        block = np.zeros((seg, seg), dtype=dtype)
        for iy, ix in zip(*np.nonzero(held[i])):
            block += energy[i, py[iy]:py[iy] + seg, px[ix]:px[ix] + seg]
        sums[i] = pairs.T @ block @ pairs
    middle = sums[:, k // 2, k // 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = sums / middle[:, None, None]
    gains[~(np.isfinite(gains).all(axis=(1, 2)) & (middle > 0))] = np.nan
    out[sky] = gains
    return out


def source_dominance(images: np.ndarray, level: np.ndarray, noise_var: np.ndarray, *,
                     kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """How far one source dominates each image, and how much of its light lies at the edge: ``(share, edge)``.

    The source energy is each pixel's squared height above ``level`` where that
    is over :data:`SOURCE_SIGMAS` times the noise (``sqrt(noise_var)``), as in
    :func:`source_gains`.  ``share`` is the fraction of it in the box of side
    ``kernel_size // 2 + 1`` about the brightest pixel (one source: about 1;
    many alike: small); ``edge`` the fraction within ``kernel_size // 2``
    pixels of the image's edges.  Both are 0 off a white sky (``noise_var``
    0) and where there is no source energy.  ``(n,)`` float64 each.
    """
    return _dominance(images, level, noise_var, kernel_size=kernel_size)[:2]


def _dominance(images: np.ndarray, level: np.ndarray, noise_var: np.ndarray, *,
               kernel_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`source_dominance`'s ``(share, edge)`` and each image's brightest source pixel (its flat index;
    -1 where there is no source energy)."""
    n, ty, tx = images.shape
    share, edge, brightest_of = np.zeros(n), np.zeros(n), np.full(n, -1, dtype=np.intp)
    sky = np.flatnonzero(noise_var > 0)
    if not sky.size:
        return share, edge, brightest_of
    h = kernel_size // 2
    reach = h // 2  # the box: the brightest pixel and this many either side
    above = _source_heights(images, level, noise_var, sky)  # the energies are their squares, summed by products
    flat = above.reshape(sky.size, -1)
    total = np.einsum("ij,ij->i", flat, flat).astype(np.float64)
    inner = above[:, h:ty - h, h:tx - h]
    inner = np.einsum("tij,tij->t", inner, inner).astype(np.float64)
    brightest = np.argmax(flat, axis=1)
    lit = np.flatnonzero(total > 0)
    for j in lit:
        y, x = divmod(int(brightest[j]), tx)
        box = above[j, max(y - reach, 0):y + reach + 1, max(x - reach, 0):x + reach + 1]
        share[sky[j]] = float(np.einsum("ij,ij->", box, box)) / total[j]
    edge[sky[lit]] = 1.0 - inner[lit] / total[lit]
    brightest_of[sky[lit]] = brightest[lit]
    return share, edge, brightest_of


def _source_heights(images: np.ndarray, level: np.ndarray, noise_var: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """The images ``sky`` (indices) as heights above their ``level`` where over :data:`SOURCE_SIGMAS` times the
    noise (``sqrt(noise_var)``), else 0: ``(sky.size, ty, tx)`` in the images' precision (float32 or float64)."""
    dtype = np.float32 if images.dtype == np.float32 else np.float64
    above = np.subtract(images if sky.size == len(images) else images[sky], level[sky, None, None].astype(dtype),
                        dtype=dtype)
    above *= above > (SOURCE_SIGMAS * np.sqrt(noise_var[sky]))[:, None, None].astype(dtype)
    return above


def _about(pixel: np.ndarray, rows: np.ndarray, reach: int, shape: tuple[int, int, int],
           out: np.ndarray | None) -> np.ndarray:
    """``out`` (a new ``shape`` map where ``None``) with the pixels within ``reach`` of each tile ``rows``'s
    ``pixel`` (flat indices, :func:`_dominance`'s brightest) set."""
    out = np.zeros(shape, dtype=bool) if out is None else out
    ys, xs = np.divmod(pixel[rows], shape[2])
    for i, y, x in zip(rows, ys, xs):
        out[i, max(y - reach, 0):y + reach + 1, max(x - reach, 0):x + reach + 1] = True
    return out


def _placed(rows: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """``rows`` ``(r, seg)`` added into a ``(r, length)`` array at each of the segments' ``starts``."""
    out = np.zeros((len(rows), length))
    for start in starts:
        out[:, start:start + rows.shape[1]] += rows
    return out


def _sky_noise(images: np.ndarray, skies: TileSkies | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sky_noise_variance` and each image's sky level (the median of :func:`sky_statistics`; its level
    and noise from ``skies`` where given, measured on the images before their bad pixels were filled)."""
    n = len(images)
    if n == 0 or min(images.shape[1:]) < 2:
        return np.zeros(n), np.zeros(n)
    level, noise, spread = sky_statistics(images, skies)
    sky = (noise > 0) & (spread < WHITE_RATIO * noise)
    if SOURCE_PIXELS > 0 and sky.any():
        picked = images if sky.all() else images[sky]  # most often every tile: no copy
        sky[sky] = _source_pixels(picked, level[sky], noise[sky]) >= SOURCE_PIXELS
    return np.where(sky, noise * noise, 0.0), level


def sky_noise_variance(images: np.ndarray) -> np.ndarray:
    """Each image's pixel-noise variance where it shows sources on a white-noise sky, else 0.

    From about 16 rows: ``sigma_d``, the robust scatter of neighbour
    differences over sqrt(2), is the pixel noise; ``sigma_p``, the robust
    scatter of the pixels about their median, is that of the sky.  They agree
    (within :data:`WHITE_RATIO`) only where a white noise dominates most
    pixels; a photograph's or a smooth image's pixels vary far more than
    their neighbour differences (measured: survey tiles 0.96-1.10, the 8-bit
    photo 66, white noise smoothed over 1 px 2.0).  And sources must stand
    out of it (at least :data:`SOURCE_PIXELS` pixels 5 sigma_d above the
    median with a 4-neighbour 3 sigma_d above it: a source lights its
    neighbours, a lone pixel does not): an image of white noise, even with a
    few bright pixels, may be the scene itself.  Returns ``(n,)`` float64.
    """
    return _sky_noise(images)[0]


def _source_pixels(images: np.ndarray, level: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Per image, the pixels more than 5 ``noise`` above ``level`` with a 4-neighbour more than 3 above it.

    Compared in the images' own precision (float32 or float64), without a copy of them.
    """
    dtype = images.dtype if images.dtype in (np.float32, np.float64) else np.float64
    n, ny, nx = images.shape
    lit_at, bright_at = ((level + c * noise).astype(dtype) for c in (3.0, 5.0))
    flat = images.reshape(-1)
    index = np.flatnonzero(images > bright_at[:, None, None])  # few: only their neighbours are looked at
    tile, rest = np.divmod(index, ny * nx)
    y, x = np.divmod(rest, nx)
    source = np.zeros(index.size, dtype=bool)  # a 4-neighbour lit too: a source, not a lone pixel
    for inside, step in ((y > 0, -nx), (y < ny - 1, nx), (x > 0, -1), (x < nx - 1, 1)):
        source |= inside & (flat[np.where(inside, index + step, index)] > lit_at[tile])
    return np.bincount(tile[source], minlength=n)


def segment_noise(power: np.ndarray, cross_power: np.ndarray, tpower: np.ndarray, used: np.ndarray, *,
                  fraction: float | np.ndarray) -> np.ndarray:
    """Each frequency's noise power from the spread of the segments about their own best fit.

    ``(P - |C|**2 / A) / (M - 1)`` with ``A`` the summed source power,
    ``|C|**2`` the cross spectrum's power, ``P`` the summed target power and
    ``M`` the kept segments times ``fraction`` squared (:func:`independent_fraction`
    of each tile's taper); 0 where ``A`` is.  ``(n, L, L // 2 + 1)`` float64.
    """
    live = power > 0
    m_eff = used * np.asarray(fraction, dtype=np.float64) ** 2
    resid = np.where(live, tpower.astype(np.float64) - cross_power / np.where(live, power, 1.0), 0.0)
    return np.maximum(resid, 0.0) / np.maximum(m_eff - 1.0, 1.0)[:, None, None]


def _auto_kernels(cross: np.ndarray, power: np.ndarray, tpower: np.ndarray, used: np.ndarray,
                  source_noise: np.ndarray, *,
                  colw: np.ndarray, fraction: np.ndarray, gains: np.ndarray, lags: np.ndarray,
                  window_of: np.ndarray, spread: np.ndarray, refit: np.ndarray, kernel_size: int,
                  workers: int, unevenness: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kernels with a Laplacian penalty whose strength is chosen per tile from the data.

    ``D = A + lam s R`` (``A`` the summed source power, ``R`` the Laplacian's
    power, ``s = mean(A) / mean(R)`` so that ``lam`` is dimensionless).  At
    each frequency the segments are independent looks at one kernel value:
    their spread about their own best fit, ``(P - |C|**2 / A) / (M - 1)``
    (``P`` the summed target power, ``M`` the kept segments times ``fraction``,
    each tile's taper's :func:`independent_fraction`, squared), measures the noise power
    ``sigma2``; ``unevenness`` (:func:`_unevenness`) raises it where a few noisier segments (a bright
    star's, noisy with its own photons) hold the power.  ``lam`` minimises the unbiased estimate of the prediction
    risk, ``RSS + 2 sum sigma2 A / D`` (``RSS = sum P - |C|**2 (2 D - A) / D**2``,
    the segments' residual energy), on :data:`LAM_GRID`, all in the Fourier
    domain.  The kernel is then confined to its stamp (:func:`_confined_solve`).
    Where ``lam`` exceeds :data:`REFINE_MAX_LAM` the penalty then acts on the
    kernel less a profile fitted to the spectra, with a strength of its own
    (:func:`_profile_kernels`); elsewhere, or where that fit cannot start, in
    rounds (each tile until its core's width changes by at most
    :data:`REFERENCE_TOLERANCE`, at most :data:`REFERENCE_ROUNDS`) on the
    kernel less the previous round's :func:`gaussian_core`.  Last, the taper's gain
    ``gains`` (``(n, k, k)``: each tile's own, :func:`source_gains`, or a white source's) is divided
    out.  ``A`` less
    ``source_noise`` (per tile, the source's noise power in every frequency)
    is the source power the kernel is fitted with; ``lags`` (``(w, L, L)``: the
    tapers' lag gains, tile ``i``'s ``lags[window_of[i]]``) and ``spread`` (the variance of the source
    noise's power, :func:`source_power_spread`) what the profile's refit
    corrects for, on the tiles ``refit``.  Returns ``(kernels, lam,
    at_bound, penalty, reference)``: ``lam`` and ``at_bound`` those of the plain
    penalty (how noisy the tile is); ``penalty`` the ``lam s R`` the kernel was
    solved with and ``reference`` the profile it acted about (NaN where that was
    the kernel's own Gaussian core): what :func:`_refine` keeps.
    """
    n, seg, _ = power.shape
    w = colw[None, :]
    lap = laplacian_power(seg)
    a = power.astype(np.float64)
    # the source's own noise power taken out of the fit's (errors in variables): else it shrinks the kernel
    a_fit = np.maximum(a - source_noise[:, None, None], SIGNAL_FLOOR * a)
    q = np.abs(cross.astype(np.complex128)) ** 2
    scale = (a * w).sum(axis=(1, 2)) / (lap * w).sum()
    live = a > 0
    noise = w * segment_noise(a, q, tpower, used, fraction=fraction)
    if unevenness is not None:
        noise *= unevenness

    a_safe = np.where(live, a_fit, 1.0)  # the risk's coefficients are 0 there: any D > 0
    best = _risk_minimum(a, a_safe, q, noise, w, lap, scale)
    lam = LAM_GRID[best]
    penalty = (lam * scale)[:, None, None] * lap
    d = a_fit + penalty
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    dtype = np.float32 if cross.dtype == np.complex64 else np.float64
    # the solves' and the rounds' products act on the stamp alone: on the smallest grid that holds them
    d_op, inv_op, pull_op = (stamp_operator(f, kernel_size, workers=workers).astype(np.result_type(dtype, np.complex64))
                             for f in (d, inv, penalty))
    rhs = _stamp_cross(cross, kernel_size, workers)
    kernels = _confined_solve(cross, inv, rhs, (d_op, inv_op), workers, dtype=dtype)
    # Noisy tiles: smoothed towards a profile fitted to the spectra.
    noisy = np.flatnonzero(lam > REFINE_MAX_LAM) if PROFILE_ITERATIONS else np.zeros(0, dtype=np.intp)
    profiled = np.zeros(n, dtype=bool)
    reference = np.full(kernels.shape, np.nan)
    if noisy.size:
        kernels[noisy], profiled[noisy], reference[noisy], strength = _profile_kernels(
            cross[noisy], a[noisy], a_fit[noisy], q[noisy], noise[noisy], w, lap, scale[noisy], gains[noisy],
            rhs[noisy], kernels[noisy], (lam * scale)[noisy], d_op[noisy], lags, window_of[noisy],
            spread[noisy], refit[noisy], workers=workers, dtype=dtype)
        penalty[noisy[profiled[noisy]]] = strength[profiled[noisy], None, None] * lap
    # The others (hardly any noise, as on a photograph): rounds in which the Laplacian acts on (kernel - its
    # Gaussian core), each tile until its core's width settles: every tile's rounds depend on that tile
    # alone.  Each round's moments start from the last's.
    active = np.flatnonzero(~profiled)
    width = np.full(n, np.nan)
    moments = None
    for _ in range(REFERENCE_ROUNDS):
        core, sigma, moments = gaussian_core(kernels[active], with_width=True, start=moments)
        settled = np.abs(sigma / width[active] - 1.0) <= REFERENCE_TOLERANCE
        moving = ~settled & np.isfinite(sigma)
        width[active] = sigma
        active, core = active[moving], core[moving]
        if not active.size:
            break
        pull = _stamp_product(core, pull_op[active], workers)
        before = kernels[active]
        after = _stamp_cg(rhs[active] + pull, before, d_op[active], inv_op[active], REFERENCE_ITERATIONS,
                          dtype=dtype, workers=workers)
        # the core keeps the kernel's sum: a round that moves it by half is not converging; keep the last
        with np.errstate(divide="ignore", invalid="ignore"):
            stable = np.abs(after.sum(axis=(1, 2)) / before.sum(axis=(1, 2)) - 1.0) <= 0.5
        kernels[active[stable]] = after[stable]
        keep = np.flatnonzero(moving)[stable]
        active = active[stable]
        moments = Moments(**{f.name: getattr(moments, f.name)[keep] for f in fields(Moments)})
    kernels /= gains
    return kernels, lam, best == LAM_GRID.size - 1, penalty, reference


def _unevenness(sp: WelchSpectra, part: slice) -> np.ndarray:
    """Per frequency, how much noisier than the segments' mean are those that hold the source power there:
    ``sum_s |FS_s|**2 n_s / (A mean(n_s))`` (``n_s`` a segment's noise level, :attr:`WelchSpectra.weighted_power`);
    1 where undefined.  The noise of the summed cross spectrum is ``sum_s |FS_s|**2 n_s``, which the
    segments' pooled spread (their mean noise) times ``A`` underestimates where a bright star's few
    segments, noisier with its photons, hold most of the power."""
    power = sp.power[part].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = sp.weighted_power[part] / (power * sp.mean_level[part][:, None, None])
    return np.where((power > 0) & np.isfinite(ratio) & (ratio > 0), ratio, 1.0)


def _risk_minimum(a: np.ndarray, a_safe: np.ndarray, q: np.ndarray, noise: np.ndarray, w: np.ndarray,
                  lap: np.ndarray, scale: np.ndarray, *, cross: np.ndarray | None = None,
                  prior: np.ndarray | None = None, grid: np.ndarray = LAM_GRID) -> np.ndarray:
    """Each tile's index in ``grid`` (:data:`LAM_GRID`) of the least estimated prediction risk.

    With ``D = A_fit + lam s R``, the per-frequency estimate ``K = C / D`` has
    the residual energy ``sum P - |C|**2 (2 D - A) / D**2`` and the degrees of
    freedom ``sum A / D``; the risk is the first plus twice the second
    weighted by the noise power, less the constant ``sum P``.  With a
    ``prior`` (the half spectrum ``m`` the penalty pulls towards; ``cross``
    ``C`` then needed), ``K = (C + lam s R m) / D``: the residual energy
    gains ``-2 lam s R Re(C* m) / D + A (2 lam s R Re(C* m) + (lam s R)**2
    |m|**2) / D**2``.  Searched on every fourth value of the grid first,
    then the three either side of each tile's best.
    """
    n = len(a)
    first = 2.0 * (noise * a - w * q)
    second = w * q * a
    if prior is not None:
        along = (np.conj(cross) * prior).real
        third = -2.0 * w * lap * along
        fourth = 2.0 * w * a * lap * along
        fifth = w * a * lap**2 * np.abs(prior) ** 2

    def risk(lam: np.ndarray) -> np.ndarray:
        u = (lam * scale)[:, None, None] * lap
        u += a_safe
        np.reciprocal(u, out=u)
        value = np.einsum("tij,tij->t", first, u) + np.einsum("tij,tij->t", second, u * u)
        if prior is not None:
            ls = lam * scale
            value += ls * (np.einsum("tij,tij->t", third, u) + np.einsum("tij,tij->t", fourth, u * u))
            value += ls**2 * np.einsum("tij,tij->t", fifth, u * u)
        return value

    coarse = np.arange(0, grid.size, 4)
    scores = np.stack([risk(np.full(n, grid[i])) for i in coarse])
    centre = coarse[np.argmin(scores, axis=0)]
    fine = np.clip(centre[None, :] + np.arange(-3, 4)[:, None], 0, grid.size - 1)
    scores = np.stack([risk(grid[i]) for i in fine])
    return np.take_along_axis(fine, np.argmin(scores, axis=0)[None, :], axis=0)[0]


def _profile_kernels(cross: np.ndarray, a: np.ndarray, a_fit: np.ndarray, q: np.ndarray, noise: np.ndarray,
                     w: np.ndarray, lap: np.ndarray, scale: np.ndarray, gains: np.ndarray, rhs: np.ndarray,
                     start: np.ndarray, start_strength: np.ndarray, d_op: np.ndarray, lags: np.ndarray,
                     window_of: np.ndarray, spread: np.ndarray, refit: np.ndarray, *, workers: int,
                     dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Kernels smoothed towards a profile fitted to the spectra: ``(kernels, fitted, profile, strength)``.

    An elliptical Gaussian, and a Moffat profile from it where that fits
    better by more than :data:`MOFFAT_GAIN` (:mod:`pipeline.core.profiles`),
    times the taper's ``gains``, is fitted by weighted least squares,
    ``sum |C - A_fit H|**2 / (sigma2 A)`` (``sigma2`` the noise per unit
    source power, ``noise / w``): the maximum likelihood over all the
    frequencies, as the stamp's quadratic form.  On the tiles ``refit`` it
    is then refitted (:data:`REFIT_ITERATIONS`) with what the taper adds to the cross
    spectrum for that profile, the source's light spread as its
    autocorrelation says, beyond what it adds for points (with the white
    gain on both sides: the tiles' own ``gains`` describe their points) taken
    out (:func:`taper_bias`, ``lags[window_of]`` the tiles' tapers' lag
    gains), and with ``spread``, the variance of the source noise's power
    in ``A`` (:func:`source_power_spread`), taken out of ``A_fit**2`` in the
    quadratic term (errors in variables: with these weights the whole
    first-order bias of the fit's equations).  The Laplacian then acts on
    the kernel less that profile, its strength chosen by the risk about it
    (:func:`_risk_minimum`, on :data:`PROFILE_LAM_GRID`), the solve confined
    to the stamp, and the kernel takes the profile's flux (fitted on every
    frequency, not only the few lowest that set a kernel's sum).  ``start``:
    the kernels of the plain penalty of strength ``start_strength`` (``lam
    s``), ``d_op`` its ``D``'s :func:`stamp_operator`.  ``fitted``: the
    tiles whose start's adaptive moments succeeded; the others' kernels are
    their ``start``.  ``profile``:
    each tile's profile without the gains, ``strength`` its penalty's ``lam
    s`` (NaN where not fitted).
    """
    seg = a.shape[1]
    k = start.shape[-1]
    sig2 = noise / w
    good = (a > 0) & (sig2 > 0)
    # where the "noise" is the taper's misfit (a noise-free image) a few frequencies would rule the fit
    ranked = np.sort(np.where(good, sig2, np.inf).reshape(len(a), -1), axis=1)
    middle = np.maximum(good.sum(axis=(1, 2)) - 1, 0) // 2
    typical = np.where(good.any(axis=(1, 2)), np.take_along_axis(ranked, middle[:, None], axis=1)[:, 0], 0.0)
    sig2 = np.maximum(sig2, PROFILE_NOISE_FLOOR * typical[:, None, None])
    scaled = np.where(good, sig2 * a, 1.0)
    weight = np.where(good, 1.0 / scaled, 0.0)  # of the fit's squared residuals
    phi = np.where(good, a_fit / scaled, 0.0)
    cdt = np.result_type(dtype, np.complex64)
    m_op = stamp_operator(phi * a_fit, k, workers=workers).astype(cdt)
    b = _stamp_cross(cross * phi, k, workers).astype(np.float64)
    period = (m_op.shape[1], m_op.shape[1])

    def through(ops: np.ndarray):
        """The fit's ``normal(x, sub)``: the tiles ``sub`` (distinct, ascending) of those with ``ops``."""

        def normal(x: np.ndarray, sub: np.ndarray) -> np.ndarray:
            m, p = x.shape[:2]
            spec = stamp_spectra(x.reshape(m * p, k, k).astype(dtype), period, workers=workers)
            view = spec.reshape(m, p, *spec.shape[1:])
            view *= (ops if len(sub) == len(ops) else ops[sub])[:, None]
            return stamp_lags(spec, period, k, workers=workers).reshape(m, p, k, k).astype(np.float64)

        return normal

    mom = adaptive_moments(start / gains)
    flux = (start / gains).sum(axis=(1, 2))
    fitted = np.asarray(mom.converged) & (flux > 0)
    kernels = start.copy()
    rows = np.flatnonzero(fitted)
    profile = np.full(start.shape, np.nan)
    strength = np.full(len(start), np.nan)
    if not rows.size:
        return kernels, fitted, profile, strength
    at = profiles.start_parameters(flux[rows],
                                   *(np.asarray(v)[rows] for v in (mom.y, mom.x, mom.myy, mom.mxx, mom.mxy)))
    g_rows = gains[rows]
    normal_rows = through(m_op[rows])
    params, core, value = profiles.fit_profiles(normal_rows, b[rows], g_rows, at, moffat=False,
                                                iterations=PROFILE_ITERATIONS)
    # the stamp's sums are the spectra's over seg**2
    promising = np.flatnonzero(profiles.moffat_gain(normal_rows, b[rows], g_rows, params) * seg**2
                               > MOFFAT_GAIN * MOFFAT_PROMISE)
    if promising.size:
        at = params[promising].copy()
        at[:, 6] = MOFFAT_START_NU
        m_params, m_core, m_value = profiles.fit_profiles(
            through(m_op[rows[promising]]), b[rows[promising]], g_rows[promising], at, moffat=True,
            iterations=MOFFAT_ITERATIONS)
        better = (value[promising] - m_value) * seg**2 > MOFFAT_GAIN
        params[promising[better]], core[promising[better]] = m_params[better], m_core[better]

    a_rows, a_fit_rows = a[rows], a_fit[rows]
    cross_rows, q_rows, rhs_rows = cross[rows], q[rows], rhs[rows]
    # the profile refitted to the spectra corrected for it (not where a source at the tile's edge rules it:
    # the whole tile's least squares refine those, and the corrections assume a taper's stationary gain)
    again = np.flatnonzero(refit[rows]) if REFIT_ITERATIONS else np.zeros(0, dtype=np.intp)
    if again.size:
        tiles = rows[again]
        drawn = profiles.draw(params[again], k)
        moffat = params[again, 6] > 0
        cross_rows[again] -= taper_bias(drawn, a_fit[tiles], lags[window_of[tiles]],
                                        workers=workers).astype(cross.dtype)
        q_rows[again] = np.abs(cross_rows[again].astype(np.complex128)) ** 2
        rhs_rows[again] = _stamp_cross(cross_rows[again], k, workers)
        b_again = _stamp_cross(cross_rows[again] * phi[tiles], k, workers).astype(np.float64)
        m_fit = m_op[tiles]
        if spread[tiles].any():
            squares = a_fit[tiles] ** 2
            unbiased = np.maximum(squares - spread[tiles, None, None], SIGNAL_FLOOR * squares)
            # a first-order correction: not where it would take much of what the fit knows of the width
            width_info = weight[tiles] * w * lap * np.abs(stamp_spectra(drawn * g_rows[again], (seg, seg),
                                                                        workers=workers)) ** 2
            share = np.einsum("tij,tij->t", width_info, unbiased) / np.einsum("tij,tij->t", width_info, squares)
            unbiased[~(share >= SPREAD_MOST_KEPT)] = squares[~(share >= SPREAD_MOST_KEPT)]
            m_fit = stamp_operator(weight[tiles] * unbiased, k, workers=workers).astype(cdt)
        for kind in (False, True):
            local = np.flatnonzero(moffat == kind)
            if local.size:
                sub = again[local]
                params[sub], core[sub], _ = profiles.fit_profiles(
                    through(m_fit[local]), b_again[local], g_rows[sub], params[sub], moffat=kind,
                    iterations=REFIT_ITERATIONS)
    prior = _centred_spectra(core, seg, workers)
    best = _risk_minimum(a_rows, np.where(a_rows > 0, a_fit_rows, 1.0), q_rows, noise[rows], w, lap, scale[rows],
                         cross=cross_rows, prior=prior, grid=PROFILE_LAM_GRID)
    lam_s = PROFILE_LAM_GRID[best] * scale[rows]
    d = a_fit_rows + lam_s[:, None, None] * lap
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    # the restriction to the stamp is linear in the filter: D's from the first solve's, the Laplacian's once
    lap_op = stamp_operator(lap[None], k, workers=workers)[0]
    d_op = (d_op[rows] + ((lam_s - start_strength[rows])[:, None, None] * lap_op)).astype(cdt)
    inv_op = stamp_operator(inv, k, workers=workers).astype(cdt)
    pull = _stamp_product(core.astype(dtype), (lam_s[:, None, None] * lap_op).astype(cdt), workers)
    out = _stamp_cg(rhs_rows + pull, core, d_op, inv_op, PROFILE_CG_ITERATIONS, dtype=dtype, workers=workers)
    out *= (params[:, 0] / (out / g_rows).sum(axis=(1, 2)))[:, None, None]
    kernels[rows] = out
    profile[rows] = profiles.draw(params, k)
    strength[rows] = lam_s
    return kernels, fitted, profile, strength


def source_power_spread(source_noise: np.ndarray, kept: np.ndarray, window: np.ndarray, starts_y: np.ndarray,
                        starts_x: np.ndarray) -> np.ndarray:
    """The variance of the source noise's power summed over each tile's kept segments, at any frequency, ``(n,)``.

    Each segment's noise power is exponential (complex Gaussian noise) of
    mean ``nu = source_noise / used`` (``used`` the kept segments of
    ``kept``, ``(n, ny, nx)``, whose first pixels are ``starts_y`` and
    ``starts_x``) and variance ``nu**2``; two segments ``d`` apart are
    correlated through their overlap, the covariance of their powers
    ``nu**2 rho(dy)**2 rho(dx)**2`` (``rho`` the taper's overlap
    correlation, :func:`independent_fraction`'s; the last segment of an
    axis may lie closer to the one before it than the step): the sum over
    all pairs of kept segments.  It is what the profile's refit takes out of
    the square of the source power less its mean (``A_fit``) in its
    quadratic term: with the fit's weights ``1 / (sigma2 A)`` the terms of
    the signal times the noise cancel to first order and this variance is
    the whole of the bias (a scalar model, 400 frequencies of 8 segments,
    true gain 0.7: 0.704 / 0.700 / 0.701 at a signal-to-noise power of 0.5 /
    1 / 3 a segment, 0.46 / 0.61 / 0.69 without it; 1.16 / 0.88 / 0.76
    with the signal-noise terms taken out as well).
    """
    kept = np.asarray(kept, dtype=np.float64)
    n = len(kept)
    full = np.correlate(window, window, mode="full")
    mid = window.size - 1

    def pairs(starts: np.ndarray) -> np.ndarray:
        apart = np.abs(np.subtract.outer(starts, starts))
        return np.where(apart <= mid, full[mid + np.minimum(apart, mid)] / full[mid], 0.0) ** 2

    summed = np.einsum("tij,tij->t", pairs(np.asarray(starts_y)) @ kept @ pairs(np.asarray(starts_x)), kept)
    used = kept.sum(axis=(1, 2))
    nu = np.divide(np.asarray(source_noise, dtype=np.float64), used, out=np.zeros(n), where=used > 0)
    return nu**2 * summed


def taper_bias(kernels: np.ndarray, power: np.ndarray, lags: np.ndarray, *, workers: int = 1) -> np.ndarray:
    """What tapering adds to the segments' cross spectrum beyond the model ``A F(K a)`` for ``(n, k, k)`` kernels.

    The model the spectra are fitted with, ``C = A F(K a)`` (``A`` the source
    power ``power``, ``a`` the taper's lag gain ``lags``, ``(n, L, L)``), is
    exact for a white source.  A stationary source of autocorrelation ``R``
    gives ``c(d) = a(d) sum_j K(j) R(d - j)`` with ``a R`` the correlation
    that ``A`` transforms: for each pair of the source's pixels ``e`` apart,
    the model takes ``a(j) a(e)`` for ``a(j + e)``.  With ``a(d) ~ 1 -
    alpha |d|**2`` the difference is ``2 alpha (j . e)``, and the kernel's
    variance comes out low by ``4 alpha V_R`` (``V_R`` ``R``'s, per axis:
    twice the PSF's for a star field; -1.1 % in width with a sine taper of 64
    and a PSF of sigma 1.5).  Returns ``F(a (K * R)) - A F(K a)``, ``(n, L, L
    // 2 + 1)`` complex128.
    """
    seg = power.shape[1]
    k = kernels.shape[-1]
    crop = (np.arange(k) - k // 2) % seg
    corr = sfft.irfft2(power, s=(seg, seg), workers=workers)
    corr /= lags
    blurred = sfft.irfft2(sfft.rfft2(corr, workers=workers) * _centred_spectra(kernels, seg, workers),
                          s=(seg, seg), workers=workers)
    blurred *= lags
    model = _centred_spectra(kernels * lags[:, crop[:, None], crop[None, :]], seg, workers)
    return sfft.rfft2(blurred, workers=workers) - power * model


def _centred_spectra(stamps: np.ndarray, seg: int, workers: int) -> np.ndarray:
    """The ``(n, L, L // 2 + 1)`` half spectra of ``(n, k, k)`` stamps centred on the ``L x L`` grid's origin
    (offset ``j`` at lag ``j``, as the kernels' transforms are)."""
    h = stamps.shape[-1] // 2
    shift = np.exp(2j * np.pi * h * (sfft.fftfreq(seg)[:, None] + sfft.rfftfreq(seg)[None, :]))
    return stamp_spectra(stamps, (seg, seg), workers=workers) * shift


def gaussian_core(kernels: np.ndarray, *, with_width: bool = False, start: Moments | None = None):
    """The elliptical Gaussian of each kernel's adaptive moments and sum, on its stamp (0 where they fail).

    What ``regularization="auto"`` smooths towards: the Laplacian penalty acts
    on the kernel less this core, so a sharp peak is not flattened.  With
    ``with_width``, also the cores' ``sigma`` (NaN where the moments fail)
    and the moments.  ``start``: moments to start their iteration from
    (:func:`~pipeline.core.moments.adaptive_moments`).
    """
    k = kernels.shape[-1]
    h = k // 2
    m = adaptive_moments(kernels, start=start, tol=CORE_TOLERANCE)
    flux = kernels.sum(axis=(1, 2))
    ok = np.asarray(m.converged) & (flux > 0)
    myy, mxx, mxy = (np.where(ok, v, c) for v, c in ((m.myy, 1.0), (m.mxx, 1.0), (m.mxy, 0.0)))
    dy = np.arange(k)[None, :, None] - h - np.where(ok, m.y, 0.0)[:, None, None]
    dx = np.arange(k)[None, None, :] - h - np.where(ok, m.x, 0.0)[:, None, None]
    det = (myy * mxx - mxy**2)[:, None, None]
    core = np.exp(-0.5 * (mxx[:, None, None] * dy**2 - 2.0 * mxy[:, None, None] * dy * dx
                          + myy[:, None, None] * dx**2) / det)
    core *= np.where(ok, flux, 0.0)[:, None, None] / core.sum(axis=(1, 2), keepdims=True)
    if with_width:
        return core, np.where(ok, np.asarray(m.sigma), np.nan), m
    return core


def stamp_operator(filters: np.ndarray, kernel_size: int, *, workers: int = 1) -> np.ndarray:
    """The circulant ``filters`` (``(n, L, L // 2 + 1)`` half spectra) restricted to a ``k x k`` stamp,
    as half spectra on the smallest fast grid that holds that restriction exactly.

    Between two stamp pixels the lag is at most ``k - 1`` either way, so the
    restricted operator reads the filter's real-space kernel at those lags
    alone; on a grid of ``P >= 2k - 1`` they do not wrap onto each other.
    Products by the result (:func:`_stamp_product`) equal the restriction of
    the products on the ``L`` grid, at a fraction of the cost (``k = 21``:
    ``P = 42`` against ``L = 64``).  Where ``L`` is no larger, ``filters`` are
    returned as they are.
    """
    seg = filters.shape[1]
    period = sfft.next_fast_len(2 * kernel_size - 1, real=True)
    if period >= seg:
        return filters
    real = sfft.irfft2(filters, s=(seg, seg), workers=workers)
    lags = np.arange(-(kernel_size - 1), kernel_size)
    small = np.zeros((len(filters), period, period), dtype=real.dtype)
    small[:, (lags % period)[:, None], (lags % period)[None, :]] = real[:, (lags % seg)[:, None], (lags % seg)[None, :]]
    return sfft.rfft2(small, workers=workers)


def _stamp_product(x: np.ndarray, operator: np.ndarray, workers: int) -> np.ndarray:
    """``(n, k, k)`` stamps through a :func:`stamp_operator` (the stamp in the grid's corner: a circulant
    commutes with the shift), in ``x``'s precision."""
    k = x.shape[-1]
    period = operator.shape[1]
    spec = stamp_spectra(x, (period, period), workers=workers)
    spec *= operator
    return stamp_lags(spec, (period, period), k, workers=workers)


def _confined_solve(cross: np.ndarray, inv: np.ndarray, rhs: np.ndarray, operators: tuple[np.ndarray, np.ndarray],
                    workers: int, *, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Stamp-supported kernels minimising ``sum_f D |K|**2 - 2 Re(K* C)``, by preconditioned CG.

    The normal matrix is the circulant ``D`` restricted to the stamp; the
    right-hand side ``rhs`` is the cross correlation on the stamp
    (:func:`_stamp_cross`); the preconditioner is ``inv = 1 / D`` restricted
    the same way (``operators``: ``D``'s and ``inv``'s on
    :func:`stamp_operator`'s grid).  :data:`CG_ITERATIONS` iterations start
    from the cropped unconfined solution ``C / D``; their transforms run in
    ``dtype``; the kernels are float64.
    """
    start = _stamp_cross(cross * inv.astype(dtype), rhs.shape[-1], workers)
    return _stamp_cg(rhs, start, *operators, CG_ITERATIONS, dtype=dtype, workers=workers)


def _stamp_cross(spectra: np.ndarray, kernel_size: int, workers: int) -> np.ndarray:
    """The real-space values of half spectra (``(n, L, L // 2 + 1)``) at the stamp's lags, ``(n, k, k)``."""
    seg = spectra.shape[1]
    crop = (np.arange(kernel_size) - kernel_size // 2) % seg
    return np.ascontiguousarray(sfft.irfft2(spectra, s=(seg, seg), workers=workers)[:, crop[:, None], crop[None, :]])


def _tile_dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-tile inner products of ``(n, k, k)`` stamps, accumulated in float64."""
    return np.einsum("tij,tij->t", u, v, dtype=np.float64)


def _stamp_cg(b: np.ndarray, start: np.ndarray, d_op: np.ndarray, inv_op: np.ndarray, iterations: int, *,
              dtype: np.dtype | type, workers: int) -> np.ndarray:
    """``iterations`` of preconditioned CG on ``D x = b`` over ``(n, k, k)`` stamps from ``start``: ``D`` and
    the preconditioner are operators of :func:`stamp_operator`, their products in ``dtype``; ``x`` is float64."""

    def through(x: np.ndarray, op: np.ndarray) -> np.ndarray:
        return _stamp_product(x, op, workers)

    d_op, inv_op = (op.astype(np.result_type(dtype, np.complex64), copy=False) for op in (d_op, inv_op))
    b = b.astype(dtype)
    x = np.array(start, dtype=np.float64)
    r = b - through(x.astype(dtype), d_op)
    z = through(r, inv_op)
    p = z.copy()
    rz = _tile_dot(r, z)
    for _ in range(iterations):
        ap = through(p, d_op)
        pap = _tile_dot(p, ap)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 0)
        x += alpha[:, None, None] * p
        r -= (alpha[:, None, None] * ap).astype(dtype)
        z = through(r, inv_op)
        rz_new = _tile_dot(r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = (z + beta[:, None, None] * p).astype(dtype)
        rz = rz_new
    return x


def _refine(sources: np.ndarray, targets: np.ndarray, kernels: np.ndarray, penalty: np.ndarray,
            energy: np.ndarray, source_bad: np.ndarray | None, target_bad: np.ndarray | None, *, workers: int,
            iterations: int | None = None, reference: np.ndarray | None = None) -> np.ndarray:
    """Kernels refined towards the exact least squares on the whole tile, by flexible PCG from ``kernels``.

    Minimises ``|P (T - S (*) K)|**2 + c (K - G)' Pen (K - G)`` over the tile's valid pixels
    (those whose whole stamp lies in the tile and is good in both images; ``P`` removes their
    mean: a constant background), ``G`` the ``reference`` where it is finite (the profile the Welch
    solve acted about), else the kernel's Gaussian core, ``Pen`` the circulant
    penalty of the Welch solve and ``c`` the ratio of the tile's energy to the segments'
    (``energy``).  Unlike the segments' tapered spectra, this is unbiased however little noise
    there is (the taper does not commute with the blur).  The products run through transforms
    of the tile's size (exact: the valid pixels see no wrap-around); the preconditioner is a
    circulant of the tile's own autocorrelation (lags within half a segment) plus the penalty,
    confined to the stamp and solved by :data:`REFINE_PRECONDITIONER_ITERATIONS` of PCG (so the
    outer iteration is the flexible form).  Iterations: :data:`REFINE_ITERATIONS` unless given.
    """
    n, ty, tx = sources.shape
    seg = penalty.shape[1]
    k = kernels.shape[-1]
    h = k // 2
    dtype = np.float32 if sources.dtype == np.float32 and targets.dtype == np.float32 else np.float64
    src = sources.astype(np.float64)
    tgt = targets.astype(np.float64)
    valid = (slice(None), slice(2 * h, ty), slice(2 * h, tx))  # circular conv index of the valid pixels
    # a target pixel is used where it and its whole stamp in the source are good (the same arithmetic
    # whether or not there are bad pixels: a tile's result does not depend on the maps of others)
    sbad = np.zeros((n, ty, tx), dtype=bool) if source_bad is None else source_bad
    usable = fit_region(sbad, k) if target_bad is None else fit_region(sbad, k) & ~target_bad
    mask = usable[:, h:ty - h, h:tx - h]
    good = np.maximum((~sbad).sum(axis=(1, 2), keepdims=True), 1)
    src = np.where(sbad, 0.0, src - np.where(sbad, 0.0, src).sum(axis=(1, 2), keepdims=True) / good)
    count = np.maximum(mask.sum(axis=(1, 2), keepdims=True), 1).astype(dtype)
    weight = mask.astype(dtype)
    fs = sfft.rfft2(src.astype(dtype), workers=workers)
    fsc = fs.conj()
    tv = tgt[:, h:ty - h, h:tx - h]  # the target pixels of the valid conv indices
    tv = np.where(mask, tv - (tv * mask).sum(axis=(1, 2), keepdims=True) / count, 0.0).astype(dtype)
    # stamp lag j (0..k-1) is kernel offset j - h; conv index y = target pixel y - h

    def forward(x: np.ndarray) -> np.ndarray:
        spec = stamp_spectra(x, (ty, tx), workers=workers)
        spec *= fs
        out = sfft.irfft2(spec, s=(ty, tx), workers=workers)[valid]
        out = out - (out * weight).sum(axis=(1, 2), keepdims=True, dtype=np.float64).astype(dtype) / count
        out *= weight
        return out

    def adjoint(r: np.ndarray) -> np.ndarray:
        full = np.zeros((len(r), ty, tx), dtype=dtype)
        full[valid] = r
        spec = sfft.rfft2(full, workers=workers)
        spec *= fsc
        return stamp_lags(spec, (ty, tx), k, workers=workers)  # only the stamp's k x k lags

    full_energy = (src[valid] ** 2 * mask).sum(axis=(1, 2))  # approximately the tile's zero-lag power
    c = (full_energy / np.maximum(energy, 1e-300))[:, None, None]
    # the preconditioner: the tile's own autocorrelation at lags within half a segment (a Bartlett lag
    # window keeps its spectrum nonnegative) as a circulant on the segment grid, plus the penalty (the
    # Welch operator lacks the tile's large-scale power: with it the first steps overshot)
    auto = sfft.irfft2((fs * fsc).real.astype(np.float64), s=(ty, tx), workers=workers)
    lags = np.rint(sfft.fftfreq(seg, 1.0 / seg)).astype(int)  # 0, 1, ..., -1: the circulant's lags
    tri = 1.0 - np.abs(lags) / (seg // 2 + 1)
    spec = np.maximum(sfft.rfft2(auto[:, lags[:, None] % ty, lags[None, :] % tx] * np.outer(tri, tri),
                                 workers=workers).real, 0.0) + c * penalty
    complex_dtype = np.result_type(dtype, np.complex64)
    op, inv, pen_op = (stamp_operator(f, k, workers=workers).astype(complex_dtype) for f in (
        spec, np.divide(1.0, spec, out=np.zeros_like(spec), where=spec > 0), c * penalty))

    def normal(x: np.ndarray) -> np.ndarray:
        return adjoint(forward(x)) + _stamp_product(x, pen_op, workers)

    def precondition(r: np.ndarray) -> np.ndarray:
        # that circulant confined to the stamp, solved by a few PCG iterations from its unconfined solution
        return _stamp_cg(r, _stamp_product(r, inv, workers), op, inv, REFINE_PRECONDITIONER_ITERATIONS,
                         dtype=dtype, workers=workers).astype(dtype)

    core = gaussian_core(kernels)  # stamps as they are: index j is offset j - h, as in forward
    if reference is not None:
        given = np.isfinite(reference).all(axis=(1, 2))
        core[given] = reference[given]
    x = kernels.astype(np.float64)
    b = adjoint(tv) + _stamp_product(core.astype(dtype), pen_op, workers)
    r = (b - normal(x.astype(dtype))).astype(dtype)
    z = precondition(r)
    p = z.copy()
    rz = _tile_dot(r, z)
    total = REFINE_ITERATIONS if iterations is None else iterations
    for i in range(total):
        ap = normal(p)
        pap = _tile_dot(p, ap)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 0)
        x += alpha[:, None, None] * p
        if i == total - 1:
            break
        r -= (alpha[:, None, None] * ap).astype(dtype)
        z_old = z
        z = precondition(r)
        rz_new = _tile_dot(r, z)
        beta = np.divide(rz_new - _tile_dot(r, z_old), rz, out=np.zeros_like(rz), where=rz > 0)  # flexible
        p = (z + beta[:, None, None] * p).astype(dtype)
        rz = rz_new
    return x
