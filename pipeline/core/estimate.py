"""Public estimator API: one kernel for an image pair, or kernels for a batch of tiles.

Methods
-------
``"lstsq"`` (default)
    Exact least squares over the valid region with a compact smoothness
    penalty whose strengths maximise the Bayesian evidence, plus one robust
    pass.  No edge artifact; accurate on noisy astronomical tiles.
``"welch"``
    Overlapping tapered segments, averaged cross/auto spectra, a smoothness
    penalty whose strength the segments' own noise sets per tile, the
    kernel confined to its stamp.  Several times faster; less accurate where
    the field is sparse or faint.
``"ratio"``
    The textbook ``FFT(target) / FFT(source)``: the baseline that shows the
    cross-shaped edge artifact and noise amplification.

Direction: every batch is measured for which image of each tile is sharper
(:mod:`pipeline.core.sharpness`, with the diagnostics): a kernel fitted to the
sharper image would be a deconvolution, flagged ``target_sharper``;
``direction="reverse"`` or ``"auto"`` fit ``source ~ K * target + b`` instead.
``welch`` measures it from its own segments' spectra
(:func:`~pipeline.core.sharpness.spectra_sharpness`, no transform of its own,
the pixels its kernels are fitted to), the other methods from the whole
tiles' (:func:`~pipeline.core.sharpness.sharpness`); with ``auto`` or
``majority`` the forward tiles are fitted from the very spectra that decided.

:data:`REGISTRY` holds each method's estimator and options class
(:mod:`pipeline.core.options`); options are given as that class's object
(``options=LstsqOptions(penalty="wings")``) or as keywords
(``penalty="wings"``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .. import flags as fl
from ..errors import InputError, OptionError
from .blas import one_blas_thread
from .diagnostics import plain_centroids, residual_statistics
from .gram import fit_region
from .lstsq import LstsqResult, lstsq_kernels
from .moments import FWHM_PER_SIGMA, adaptive_moments
from .options import LstsqOptions, MethodOptions, RatioOptions, WelchOptions, option_summary
from .ratio import ratio_kernels
from .sharpness import MIN_TILE as SHARPNESS_MIN_TILE
from .sharpness import Sharpness, direction_flags, image_direction
from .sharpness import sharpness as measure_sharpness
from .validate import as_image_stack, check_kernel_size, check_positive_int, either_bad
from .welch import WelchSpectra, welch_kernels

__all__ = ["REGISTRY", "METHODS", "DEFAULT_METHOD", "DIRECTIONS", "Method", "KernelEstimates", "estimate_kernel",
           "estimate_kernels", "method_options", "tile_directions", "tile_sharpness"]

#: ``direction`` choices: ``forward`` fits ``target ~ K (*) source + b``, ``reverse`` fits
#: ``source ~ K (*) target + b``, ``auto`` each tile in the well-posed direction (its blurrier image
#: fitted), ``majority`` every tile in the direction of the majority of the batch's tiles
#: (:func:`~pipeline.core.sharpness.image_direction`), by the sharpness measure of :mod:`pipeline.core.sharpness`.
DIRECTIONS = ("forward", "reverse", "auto", "majority")
#: The choices that need the sharpness measure.
_MEASURED = ("auto", "majority")
FORWARD, REVERSE = 1, -1


@dataclass(frozen=True)
class Method:
    """An estimator method: its batched estimator and options class (which names the method)."""

    #: ``f(sources, targets, bad, *, kernel_size, options, source_bad, target_bad)``
    estimator: Callable[..., Any]
    options: type[MethodOptions]
    #: whether the estimator takes ``variance`` and ``source_variance`` (per-pixel noise)
    uses_variance: bool = False

    @property
    def name(self) -> str:
        return self.options.method


#: Method name -> :class:`Method`, the default first.
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method(lstsq_kernels, LstsqOptions, uses_variance=True),
        Method(welch_kernels, WelchOptions),
        Method(ratio_kernels, RatioOptions),
    )
}
DEFAULT_METHOD = next(iter(REGISTRY))
#: Method name -> batched estimator (the estimators of :data:`REGISTRY`).
METHODS: dict[str, Callable[..., Any]] = {name: m.estimator for name, m in REGISTRY.items()}


@dataclass(frozen=True)
class KernelEstimates:
    """Kernels and per-tile diagnostics of a batch; every array has ``n`` rows.

    Shape quantities come from Gaussian-weighted adaptive second moments of
    the kernel: ``centroid_y``/``centroid_x`` are offsets in pixels from the
    kernel centre, ``fwhm`` is ``2 sqrt(2 ln 2) (det M)^(1/4)``, ``e1``/``e2``
    and ``ellipticity`` use the distortion convention ``(a^2-b^2)/(a^2+b^2)``.
    Where adaptive moments have no fixed point (kernels narrower than about
    2 px, e.g. a pure shift) the shape is NaN, the tile is flagged
    ``moments_failed`` and the centroid is the plain first moment instead.
    """

    kernels: np.ndarray  #: ``(n, k, k)``; NaN where the tile is flagged unusable
    flux: np.ndarray  #: kernel sum (flux scale target/source), before any normalisation
    background: np.ndarray  #: constant offset of the target relative to ``K * source``
    residual: np.ndarray  #: RMS of the fit residual over the valid region / noise (about 1 for a good fit)
    noise: np.ndarray  #: robust (MAD) standard deviation of the fit residual
    snr: np.ndarray  #: RMS of the model signal (``K * source``) / noise
    centroid_y: np.ndarray
    centroid_x: np.ndarray
    fwhm: np.ndarray
    size: np.ndarray  #: ``det(M)^(1/4)`` in pixels: the sigma of a round Gaussian (fwhm / 2.3548)
    e1: np.ndarray
    e2: np.ndarray
    ellipticity: np.ndarray
    #: angle of the major axis from +x towards +y, degrees in (-90, 90]: ``atan2(e2, e1) / 2``
    position_angle: np.ndarray
    #: dimensionless ``lam`` used (lstsq: geometric mean over penalty terms; welch: the Laplacian's or the
    #: fixed ridge's), NaN for ratio
    regularization: np.ndarray
    n_valid: np.ndarray  #: target pixels fitted (lstsq) or kept segments (welch)
    #: ``FWHM_target^2 - FWHM_source^2`` of the input pair, pixels squared (:func:`~pipeline.core.sharpness.sharpness`):
    #: positive where the target is blurrier; NaN where not measured
    width_difference: np.ndarray
    width_difference_error: np.ndarray  #: its one-sigma uncertainty, pixels squared
    #: ``1`` fitted forward (``target ~ K * source + b``), ``-1`` reverse (``source ~ K * target + b``: the
    #: kernel, flux, background, residual, noise and snr are those of that fit, in the source's units)
    direction: np.ndarray
    flags: np.ndarray  #: quality bits, see :mod:`pipeline.flags`
    method: str
    #: with ``statistics=True``: ``(gc, cc, yy, lam_terms)`` of each lstsq fit, as
    #: :class:`~pipeline.core.joint.TileStatistics` takes them (``gc`` ``(n, k*k, k*k)``)
    statistics: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.flags)

    def as_dict(self) -> dict[str, np.ndarray]:
        """All per-tile arrays by name (without ``method`` and ``statistics``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("method", "statistics")}


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method not in REGISTRY:
        raise OptionError(
            f"method={method!r} is not known; choose one of {', '.join(sorted(REGISTRY))} "
            f"(default {DEFAULT_METHOD!r})"
        )
    return str(method)


def method_options(method: str, options: MethodOptions | None = None, **option_keywords: Any) -> MethodOptions:
    """The options object of ``method`` from an options object and/or keywords (keywords win).

    Raises :class:`~pipeline.errors.OptionError` for an unknown method, an
    options object of another method, an unknown keyword (naming the
    allowed ones) or an invalid value.
    """
    return REGISTRY[_check_method(method)].options.resolve(options, option_keywords)


def _variances(variance, source_variance, shape):
    """Validated per-pixel variances (or ``None``), and where they say a pixel is bad (not finite)."""
    out, bad = [], []
    for name, var in (("variance", variance), ("source_variance", source_variance)):
        if var is None:
            out.append(None)
            bad.append(None)
            continue
        arr = as_image_stack(var, name, ndim=(2, 3))
        if arr.shape not in (shape, shape[1:]):
            raise InputError(f"{name} must have the targets' shape {shape} or one tile's {shape[1:]}, "
                             f"got {arr.shape}")
        arr = np.broadcast_to(np.asarray(arr, dtype=np.float64), shape)
        finite = np.isfinite(arr)
        if np.any(arr[finite] < 0):
            raise InputError(f"{name} has negative values; a variance is >= 0 (NaN or inf marks a bad pixel)")
        out.append(np.where(finite, arr, 0.0))
        bad.append(~finite)
    return out, bad


def _prepare(sources, targets, mask, kernel_size, variance=None, source_variance=None):
    """Validate inputs; return float stacks with bad pixels zeroed and the bad maps.

    float32 inputs stay float32 (the spectral methods run faster in single
    precision; the exact solver always works in float64); anything else
    becomes float64.  The inputs are never written: bad pixels are zeroed
    in copies, and arrays without bad pixels are passed on as they are.
    Each tile of each image whose largest magnitude is beyond
    ``2**±SAFE_EXPONENT`` is scaled by a power of two to a largest
    magnitude in ``[0.5, 1)`` (exact: only the exponents change), so that
    squares and sums of squares neither overflow nor underflow whatever the
    images' units; :func:`_in_units` takes the results back.  Returns
    ``(sources, targets, bad, size, exponents)`` with ``bad`` a
    :class:`BadPixels` and ``exponents`` ``(n, 2)``: each tile's source and
    target scale ``2**e``.
    """
    tgt = as_image_stack(targets, "targets", ndim=(3,))
    src = as_image_stack(sources, "sources", ndim=(2, 3))
    if src.ndim == 2:
        src = np.broadcast_to(src, tgt.shape)
    if src.shape != tgt.shape:
        raise InputError(
            f"sources and targets must have the same shape, got {src.shape} and {tgt.shape}"
        )
    if mask is not None:
        mask = as_image_stack(mask, "mask", ndim=(2, 3))
        if mask.shape not in (tgt.shape, tgt.shape[1:]):
            raise InputError(
                f"mask must have the targets' shape {tgt.shape} or one tile's {tgt.shape[1:]}, "
                f"got {mask.shape}"
            )
        mask = np.broadcast_to(mask, tgt.shape)
    size = check_kernel_size(kernel_size, tgt.shape[1:])
    single = src.dtype == np.float32 and tgt.dtype == np.float32
    dtype = np.float32 if single else np.float64
    src_f = np.asarray(src, dtype=dtype)
    tgt_f = np.asarray(tgt, dtype=dtype)
    user = None if mask is None else mask != 0
    (var_t, var_s), (bad_var_t, bad_var_s) = _variances(variance, source_variance, tgt.shape)
    bad = BadPixels(either_bad(~np.isfinite(src_f), bad_var_s), either_bad(~np.isfinite(tgt_f), bad_var_t),
                    user if user is not None and user.any() else None, var_t, var_s)
    # zero the bad pixels in copies: inputs are never written
    src_zero, tgt_zero = either_bad(bad.source, bad.mask), either_bad(bad.target, bad.mask)
    if src_zero.any():
        src_f = np.where(src_zero, 0.0, src_f).astype(dtype, copy=False)
    if tgt_zero.any():
        tgt_f = np.where(tgt_zero, 0.0, tgt_f).astype(dtype, copy=False)
    exponents = np.stack([_exponents(src_f), _exponents(tgt_f)], axis=1)
    src_f, tgt_f = (_scaled(a, e) for a, e in ((src_f, exponents[:, 0]), (tgt_f, exponents[:, 1])))
    with np.errstate(over="ignore"):  # variances far beyond the squared pixels give no weight: capped
        var_t, var_s = (None if v is None else np.minimum(_scaled(v, 2 * e), _MAX_VARIANCE)
                        for v, e in ((bad.variance, exponents[:, 1]), (bad.source_variance, exponents[:, 0])))
    bad = BadPixels(bad.source, bad.target, bad.mask, var_t, var_s)
    return src_f, tgt_f, bad, size, exponents


#: Largest variance passed on, in the units of the scaled tiles (whose pixels are below 1 in magnitude).
_MAX_VARIANCE = 1e100


#: Tiles whose largest magnitude lies within ``2**±SAFE_EXPONENT`` are not scaled: their squares and sums of
#: squares are far from float32's limits, so ordinary images (counts, calibrated fluxes) go through unchanged.
SAFE_EXPONENT = 32


def _exponents(tiles: np.ndarray) -> np.ndarray:
    """``e`` per tile with its largest magnitude in ``[2**(e-1), 2**e)``, or 0 where that magnitude is within
    ``2**±SAFE_EXPONENT`` (or the tile all zeros); finite tiles."""
    flat = tiles.reshape(len(tiles), int(np.prod(tiles.shape[1:])))
    exponents = np.frexp(np.maximum(flat.max(axis=1, initial=0.0), -flat.min(axis=1, initial=0.0)))[1]  # no |x| copy
    exponents[np.abs(exponents) <= SAFE_EXPONENT] = 0
    return exponents


def _scaled(tiles: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """``tiles / 2**exponents`` per tile, exact (``tiles`` itself where every exponent is 0)."""
    if not exponents.any():
        return tiles
    return np.ldexp(tiles, -exponents[:, None, None]).astype(tiles.dtype, copy=False)


def _in_units(part: dict[str, np.ndarray], exponents: np.ndarray) -> dict[str, np.ndarray]:
    """The results of tiles scaled by :func:`_prepare` in the images' own units (flags added where a
    kernel does not fit in a float: a target some 1e300 times the source)."""
    e_s, e_t = exponents[:, 0], exponents[:, 1]
    if not (e_s.any() or e_t.any()):
        return part
    powers = {"kernels": e_t - e_s, "flux": e_t - e_s, "background": e_t, "noise": e_t,
              "gc": 2 * e_s, "cc": e_s + e_t, "yy": 2 * e_t}
    with np.errstate(over="ignore"):
        out = {name: np.ldexp(a, powers[name].reshape(-1, *[1] * (a.ndim - 1))) if name in powers else a
               for name, a in part.items()}
    flags, unusable = fl.unusable_kernels(out["flags"], out["kernels"])
    if np.any(flags != out["flags"]):
        out["flags"] = flags
        for name in ("kernels", "flux", "background"):
            out[name] = np.where(unusable.reshape(-1, *[1] * (out[name].ndim - 1)), np.nan, out[name])
    return out


@dataclass(frozen=True)
class BadPixels:
    """Bad pixels of a batch (NaN/inf in the source, in the target, the user's mask: bad in both) and
    the known variances, whose NaN/inf also mark bad pixels."""

    source: np.ndarray  #: ``(n, ny, nx)`` bool
    target: np.ndarray  #: ``(n, ny, nx)`` bool
    mask: np.ndarray | None  #: ``(n, ny, nx)`` bool or ``None``
    variance: np.ndarray | None = None  #: the target's per-pixel variance (0 at bad pixels)
    source_variance: np.ndarray | None = None  #: the source's

    @property
    def either(self) -> np.ndarray:
        """Bad in either image."""
        either = self.source | self.target
        return either if self.mask is None else either | self.mask

    def part(self, sl: slice) -> BadPixels:
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sl]

        return BadPixels(self.source[sl], self.target[sl], cut(self.mask), cut(self.variance),
                         cut(self.source_variance))

    def subset(self, rows: np.ndarray, *, swap: bool = False) -> BadPixels:
        """The tiles ``rows`` (an index or boolean array); with ``swap`` the source's and the target's roles
        exchanged (a reverse fit)."""
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        parts = (cut(self.source), cut(self.target), cut(self.mask), cut(self.variance), cut(self.source_variance))
        if swap:
            return BadPixels(parts[1], parts[0], parts[2], parts[4], parts[3])
        return BadPixels(*parts)


def _estimate_part(method, src, tgt, bad: BadPixels, size, options, diagnostics=True, statistics=False, *,
                   measure=False, spectra: WelchSpectra | None = None):
    """Kernels and diagnostics of one contiguous part of the batch (and, with ``statistics``, the
    lstsq fits' normal equations as arrays ``gc``, ``cc``, ``yy``, ``lam_terms``; with ``measure``, the
    estimator's own sharpness measure as ``sharpness_*`` arrays).  ``spectra``: the part's Welch spectra,
    already summed (:func:`_spectra_of`)."""
    n = len(tgt)
    either = bad.either
    if spectra is not None:
        result = spectra.solve()
    else:
        extra = {"statistics": True} if statistics else {}
        if measure:
            extra["measure"] = True
        if REGISTRY[method].uses_variance:
            extra.update(variance=bad.variance, source_variance=bad.source_variance)
        result = REGISTRY[method].estimator(src, tgt, bad.mask, source_bad=_any_or_none(bad.source),
                                            target_bad=_any_or_none(bad.target), kernel_size=size, options=options,
                                            **extra)
    out = vars(result)
    kernels = np.array(out["kernels"], dtype=np.float64)
    if isinstance(result, LstsqResult):
        flags = result.flags
    else:
        flat = src.reshape(n, -1)
        flags = fl.fit_flags(
            masked=either.reshape(n, -1).any(axis=1),
            no_data=out["n_segments"] == 0 if "n_segments" in out else False,
            no_signal=~np.any(flat != flat[:, :1], axis=1),
            regularization_at_bound=out.get("at_bound", False),
        )
    flags, unusable = fl.unusable_kernels(flags, kernels)
    kernels[unusable] = np.nan
    background = np.where(unusable, np.nan, out["background"])

    if not diagnostics:
        noise = residual = snr = np.full(n, np.nan)
    elif isinstance(result, LstsqResult):  # from the fit's own statistics, over its own fit region
        noise, residual, snr = (np.where(unusable, np.nan, a) for a in (result.noise, result.residual, result.snr))
    else:
        region = fit_region(either, size)
        noise, residual, snr = residual_statistics(src, tgt, kernels, background, region)
    flux = kernels.sum(axis=(1, 2))
    moments = adaptive_moments(kernels)
    flags |= fl.kernel_flags(kernels, flux, residual=residual, moments_converged=moments.converged,
                             unusable=unusable)
    centroid_y, centroid_x = plain_centroids(kernels, moments)
    if "n_valid" in out:
        n_valid = out["n_valid"]
    elif "n_segments" in out:
        n_valid = out["n_segments"]
    else:
        n_valid = (~either).reshape(n, -1).sum(axis=1)
    kept = {}
    if statistics:
        gc, cc, yy = result.statistics
        kept = {"gc": gc, "cc": cc, "yy": yy, "lam_terms": result.lam_terms}
    if out.get("sharpness") is not None:
        kept |= {_MEASURE_PREFIX + name: value for name, value in vars(out["sharpness"]).items()}
    return kept | {
        "kernels": kernels,
        "flux": flux,
        "background": background,
        "residual": residual,
        "noise": noise,
        "snr": snr,
        "centroid_y": centroid_y,
        "centroid_x": centroid_x,
        "fwhm": moments.fwhm,
        "size": moments.fwhm / FWHM_PER_SIGMA,
        "e1": moments.e1,
        "e2": moments.e2,
        "ellipticity": moments.ellipticity,
        "position_angle": 0.5 * np.degrees(np.arctan2(moments.e2, moments.e1)),
        "regularization": out.get("lam", np.full(n, np.nan)),
        "n_valid": np.asarray(n_valid, dtype=np.int64),
        "flags": flags,
    }


def _any_or_none(bad: np.ndarray) -> np.ndarray | None:
    return bad if bad.any() else None


def _over_parts(func: Callable[[slice], dict[str, np.ndarray]], n: int, workers: int) -> dict[str, np.ndarray]:
    """``func`` of contiguous parts of a batch of ``n``, in ``workers`` threads (BLAS one-threaded in
    each); their arrays joined in order."""
    parts = [slice(int(idx[0]), int(idx[-1]) + 1) for idx in np.array_split(np.arange(n), max(1, min(workers, n)))]
    with one_blas_thread():
        if len(parts) == 1:
            return func(parts[0])
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            results = list(pool.map(func, parts))
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def _estimate_all(method, src, tgt, bad: BadPixels, size, opts, diagnostics, statistics, exponents, workers,
                  measure=False):
    """:func:`_estimate_part` over the batch, in ``workers`` threads, in the images' own units."""

    def run(sl: slice) -> dict[str, np.ndarray]:
        return _in_units(_estimate_part(method, src[sl], tgt[sl], bad.part(sl), size, opts, diagnostics,
                                        statistics, measure=measure), exponents[sl])

    return _over_parts(run, len(tgt), workers)


#: The keys of a part's results that hold the estimator's own sharpness measure.
_MEASURE_PREFIX = "sharpness_"


def _measures_own(method: str, opts: MethodOptions, tile_shape: tuple[int, ...]) -> bool:
    """Whether the method measures which image is sharper from its own spectra (Welch, on segments the
    measure resolves): the measure then costs no transform and sees the pixels the kernels are fitted to."""
    return (method == "welch" and opts.segment_size >= SHARPNESS_MIN_TILE
            and min(tile_shape[1:]) >= SHARPNESS_MIN_TILE)


def _spectra_of(src, tgt, bad: BadPixels, size, opts) -> WelchSpectra:
    """The Welch spectra of a part, its sharpness measure with them (what :func:`_estimate_part` fits)."""
    return welch_kernels(src, tgt, bad.mask, source_bad=_any_or_none(bad.source), target_bad=_any_or_none(bad.target),
                         kernel_size=size, options=opts, measure=True, spectra_only=True)


def _own_measure(merged: dict[str, np.ndarray], reverse: np.ndarray) -> Sharpness:
    """The estimator's measure, taken out of ``merged``, for the pairs as given (a reverse tile's was taken of
    the pair exchanged: its sign turns back)."""
    parts = {name[len(_MEASURE_PREFIX):]: merged.pop(name) for name in list(merged) if name.startswith(_MEASURE_PREFIX)}
    diff = np.where(reverse, -parts["width_difference"], parts["width_difference"])
    sharper, nearly = direction_flags(diff, parts["uncertainty"], FORWARD)
    return replace(Sharpness(**parts), width_difference=diff, target_sharper=sharper, nearly_equal=nearly,
                   direction=np.where(reverse, -parts["direction"], parts["direction"]).astype(np.int8))


def _sharpness(src, tgt, bad: BadPixels, given: Sharpness | None, *, measure: bool,
               workers: int = 1) -> Sharpness | None:
    """The sharpness measure of the batch: ``given`` (checked), else measured where asked and the tiles are
    large enough (in ``workers`` threads: each tile's measure is its own), else ``None``."""
    n = len(tgt)
    if given is not None:
        if not isinstance(given, Sharpness) or len(np.asarray(given.width_difference)) != n:
            raise OptionError(f"sharpness must be the Sharpness of these {n} tiles (pipeline.core.sharpness."
                              f"sharpness), got {type(given).__name__}")
        return given
    if not measure or min(tgt.shape[1:]) < SHARPNESS_MIN_TILE:
        return None

    def run(sl: slice) -> dict[str, np.ndarray]:
        part = bad.part(sl)
        return vars(measure_sharpness(src[sl], tgt[sl], mask=part.either, variance=part.variance,
                                      source_variance=part.source_variance))

    return Sharpness(**_over_parts(run, n, workers))


def _fit_measured(src, tgt, bad: BadPixels, size, opts, diagnostics, exponents, direction, workers
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``direction`` ``auto`` or ``majority`` from the Welch spectra's own measure: the spectra of every tile,
    the directions they give, and the forward tiles fitted from those spectra (their results, in order);
    the reverse ones are left to be fitted from the pair exchanged."""
    n = len(tgt)
    parts = [slice(int(idx[0]), int(idx[-1]) + 1) for idx in np.array_split(np.arange(n), max(1, min(workers, n)))]
    states = _in_parts(lambda sl: _spectra_of(src[sl], tgt[sl], bad.part(sl), size, opts), parts)
    measure = Sharpness(**{name: np.concatenate([vars(st.sharpness)[name] for st in states])
                           for name in vars(states[0].sharpness)})
    directions = tile_directions(direction, n, measure)
    forward = directions != REVERSE

    def fit(item: tuple[slice, WelchSpectra]) -> dict[str, np.ndarray] | None:
        sl, state = item
        rows = np.flatnonzero(forward[sl])
        if not rows.size:
            return None
        part = bad.part(sl)
        if rows.size < sl.stop - sl.start:  # some of the part's tiles go the other way
            return _in_units(_estimate_part("welch", src[sl][rows], tgt[sl][rows], part.subset(rows), size, opts,
                                            diagnostics, spectra=state.take(rows)), exponents[sl][rows])
        return _in_units(_estimate_part("welch", src[sl], tgt[sl], part, size, opts, diagnostics, spectra=state),
                         exponents[sl])

    done = [d for d in _in_parts(fit, list(zip(parts, states))) if d is not None]
    if not done:
        return {}, directions
    return {name: np.concatenate([d[name] for d in done]) for name in done[0]}, directions


def _in_parts(func: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``func`` of each item, a thread each (BLAS one-threaded in each), in order."""
    with one_blas_thread():
        if len(items) == 1:
            return [func(items[0])]
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            return list(pool.map(func, items))


def tile_sharpness(sources: np.ndarray, targets: np.ndarray, *, kernel_size: int, mask: np.ndarray | None = None,
                   variance: np.ndarray | None = None, source_variance: np.ndarray | None = None,
                   method: str = DEFAULT_METHOD, options: MethodOptions | None = None, workers: int = 1
                   ) -> Sharpness | None:
    """The sharpness measure :func:`estimate_kernels` takes of a batch (the same pixels, bit for bit), or
    ``None`` for tiles too small to measure; arguments as there.  ``welch`` measures from its segments'
    spectra (:func:`~pipeline.core.sharpness.spectra_sharpness`), the other methods from the whole tiles'
    (:func:`~pipeline.core.sharpness.sharpness`)."""
    src, tgt, bad, size, _ = _prepare(sources, targets, mask, kernel_size, variance, source_variance)
    method = _check_method(method)
    opts = method_options(method, options)
    if _measures_own(method, opts, tgt.shape):
        n = len(tgt)
        parts = _over_parts(lambda sl: {name: np.asarray(v) for name, v in vars(
            _spectra_of(src[sl], tgt[sl], bad.part(sl), size, opts).sharpness).items()}, n, workers)
        return Sharpness(**parts)
    return _sharpness(src, tgt, bad, None, measure=True, workers=workers)


def tile_directions(direction: str | np.ndarray | int, n: int, measure: Sharpness | None = None) -> np.ndarray:
    """Each tile's direction, ``(n,)`` int8 of ``1`` (forward) and ``-1`` (reverse), from ``direction``.

    ``"forward"``, ``"reverse"``, ``+1``/``-1`` or an ``(n,)`` array of them as
    given; ``"auto"``: reverse where ``measure`` says the target is sharper
    beyond the tolerance (``Sharpness.target_sharper``), forward elsewhere
    (nearly equal pairs, tiles not measured); ``"majority"``: every tile the
    way most of them go (:func:`~pipeline.core.sharpness.image_direction`;
    forward where none is measured).
    """
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise OptionError(f"direction={direction!r} is not known; choose one of {', '.join(DIRECTIONS)}")
        if direction in _MEASURED and measure is None:
            return np.full(n, FORWARD, dtype=np.int8)
        if direction == "auto":
            return np.where(measure.target_sharper, REVERSE, FORWARD).astype(np.int8)
        if direction == "majority":
            return np.full(n, image_direction(measure.width_difference, measure.uncertainty), dtype=np.int8)
        return np.full(n, FORWARD if direction == "forward" else REVERSE, dtype=np.int8)
    values = np.asarray(direction)
    if values.dtype.kind not in "iu" or values.shape not in ((), (n,)) or not np.isin(values, (FORWARD, REVERSE)).all():
        raise OptionError(f"direction must be one of {', '.join(map(repr, DIRECTIONS))}, or 1 / -1 per tile "
                          f"({n} values), got {direction!r}")
    return np.broadcast_to(values, (n,)).astype(np.int8)


def estimate_kernels(
    sources: np.ndarray,
    targets: np.ndarray,
    *,
    kernel_size: int,
    method: str = DEFAULT_METHOD,
    options: MethodOptions | None = None,
    mask: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    source_variance: np.ndarray | None = None,
    normalize: bool = False,
    workers: int = 1,
    diagnostics: bool = True,
    statistics: bool = False,
    direction: str | np.ndarray = "forward",
    sharpness: Sharpness | None = None,
    **option_keywords: Any,
) -> KernelEstimates:
    """Estimate the kernel of every tile of a batch, with diagnostics.

    Parameters
    ----------
    sources
        ``(n, ny, nx)`` source tiles, or one ``(ny, nx)`` source shared by all.
    targets
        ``(n, ny, nx)`` target tiles: ``target ~ fftconvolve(source, K, "same") + b``.
    kernel_size
        Odd side of the kernel, at most half the shorter tile side.
    method
        ``"lstsq"`` (default), ``"welch"`` or ``"ratio"``.
    options
        The method's options object: :class:`~pipeline.LstsqOptions`,
        :class:`~pipeline.WelchOptions` or :class:`~pipeline.RatioOptions`
        (default: the class's defaults).
    mask
        Optional, like ``targets`` or one tile; nonzero marks a bad pixel.
        NaN/inf in either image is bad too.  Bad pixels are never used.
    variance, source_variance
        Optional per-pixel variances of the targets and the sources (like
        ``targets`` or one tile; NaN/inf marks a bad pixel).  ``lstsq``'s
        robust pass judges residuals against them instead of the noise
        model it fits per tile; the other methods do not use them.
    normalize
        Divide each kernel by its sum (``flux`` still reports the sum); a
        kernel summing to zero has no normalised form: NaN, flagged
        ``no_signal``.
    workers
        Threads over tiles (each part of the batch is estimated and
        diagnosed in its own thread; BLAS runs single-threaded inside).
    diagnostics
        Compute the residual, noise and signal-to-noise of each fit (one more
        FFT convolution per tile).  ``False`` leaves them NaN; the kernel,
        flux, background, shape and flags are always there.
    statistics
        ``lstsq`` only: keep each tile's background-free normal equations
        (:attr:`KernelEstimates.statistics`, ``k**4`` floats a tile), for the
        joint fit of the kernel field (:mod:`pipeline.core.joint`).
    direction
        ``"forward"`` (default): ``target ~ K * source + b``; ``"reverse"``:
        ``source ~ K * target + b`` (the kernel, flux, background and the
        fit's residual, noise and snr then describe that fit, in the
        source's units); ``"auto"``: reverse where the target is measurably
        sharper (:func:`~pipeline.core.sharpness.sharpness`), forward
        elsewhere; ``"majority"``: the whole batch the way most of its tiles
        go (as a job fits an image); or ``1``/``-1`` per tile.
        :attr:`KernelEstimates.direction` says which each tile got.
    sharpness
        The tiles' sharpness measure if already computed (else it is
        measured with the diagnostics, or for ``"auto"`` and ``"majority"``; tiles smaller than
        16 pixels are not measured).  Where a kernel sharpens (the image it
        is fitted to is the sharper one) the tile is flagged
        ``target_sharper``; where the two are nearly equal, ``nearly_equal``.
    **option_keywords
        Method options as keywords, applied on top of ``options``; the
        names, defaults and meaning of each method's options are those of
        its options class:

{options}

    Returns
    -------
    KernelEstimates
        Kernels ``(n, k, k)`` in convolution orientation with the centre at
        ``(k//2, k//2)``, and per-tile diagnostics.  Tiles with too little
        valid data or no source signal are flagged and have NaN kernels.
    """
    method = _check_method(method)
    opts = method_options(method, options, **option_keywords)
    workers = check_positive_int("workers", workers)
    if statistics and method != "lstsq":
        raise OptionError(f"statistics=True needs method='lstsq' (the normal equations of its fits), not {method!r}")
    src, tgt, bad, size, exponents = _prepare(sources, targets, mask, kernel_size, variance, source_variance)
    n = len(tgt)
    measured = isinstance(direction, str) and direction in _MEASURED
    directions = None if measured else tile_directions(direction, n)  # checked before the work
    own = sharpness is None and (diagnostics or measured) and _measures_own(method, opts, tgt.shape)
    measure = None if own else _sharpness(src, tgt, bad, sharpness, measure=diagnostics or measured,
                                          workers=workers)
    forward_done = None
    if directions is None and own:  # the spectra first, then each tile's fit in the direction they give
        forward_done, directions = _fit_measured(src, tgt, bad, size, opts, diagnostics, exponents, direction,
                                                 workers)
    elif directions is None:
        directions = tile_directions(direction, n, measure)
    reverse = directions == REVERSE
    if not reverse.any() and forward_done is None:
        merged = _estimate_all(method, src, tgt, bad, size, opts, diagnostics, statistics, exponents, workers,
                               measure=own)
    else:  # the forward tiles and the reverse ones (source and target exchanged), each as a batch
        pieces = []
        for rows, swap in ((np.flatnonzero(~reverse), False), (np.flatnonzero(reverse), True)):
            if rows.size and forward_done is not None and not swap:
                pieces.append((rows, forward_done))
            elif rows.size:
                s_rows, t_rows = src[rows], tgt[rows]
                pieces.append((rows, _estimate_all(
                    method, t_rows if swap else s_rows, s_rows if swap else t_rows, bad.subset(rows, swap=swap),
                    size, opts, diagnostics, statistics,
                    exponents[rows][:, ::-1] if swap else exponents[rows], workers, measure=own)))
        merged = {}
        for name, first in pieces[0][1].items():
            merged[name] = np.empty((n, *first.shape[1:]), dtype=np.result_type(*(p[name] for _, p in pieces)))
            for rows, part in pieces:
                merged[name][rows] = part[name]
    if own:
        measure = _own_measure(merged, reverse)
    if normalize:  # a kernel summing to zero has no normalised form: NaN and flagged as without signal
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            kernels = merged["kernels"] / merged["flux"][:, None, None]
        merged["flags"], unusable = fl.unusable_kernels(merged["flags"], kernels)
        kernels[unusable] = np.nan
        merged["kernels"] = kernels
    if measure is None:
        merged["width_difference"] = merged["width_difference_error"] = np.full(n, np.nan)
    else:
        merged["width_difference"], merged["width_difference_error"] = measure.width_difference, measure.uncertainty
        sharpens, nearly = direction_flags(measure.width_difference, measure.uncertainty, directions)
        merged["flags"] = (merged["flags"] | np.where(sharpens, fl.TARGET_SHARPER, 0)
                           | np.where(nearly, fl.NEARLY_EQUAL, 0)).astype(fl.FLAG_DTYPE)
    merged["direction"] = directions
    kept = tuple(merged.pop(name) for name in ("gc", "cc", "yy", "lam_terms")) if statistics else None
    return KernelEstimates(method=method, statistics=kept, **merged)


def estimate_kernel(
    source: np.ndarray,
    target: np.ndarray,
    *,
    kernel_size: int,
    method: str = DEFAULT_METHOD,
    options: MethodOptions | None = None,
    mask: np.ndarray | None = None,
    normalize: bool = False,
    **option_keywords: Any,
) -> np.ndarray:
    """Estimate the kernel ``K`` with ``target ~ fftconvolve(source, K, "same") + b``.

    Returns the ``(kernel_size, kernel_size)`` kernel, centre at
    ``(kernel_size // 2, kernel_size // 2)``, not normalised unless asked.
    Raises :class:`pipeline.errors.InputError` when the inputs cannot give a
    kernel (all pixels bad, too few valid pixels, a source with no power).
    Options (``options=`` or keywords) as in :func:`estimate_kernels`, and its
    ``direction=`` (default ``"forward"``; ``"reverse"`` gives ``K`` with
    ``source ~ K * target + b``, ``"auto"`` whichever is well posed: see
    :func:`estimate_kernels`, whose ``direction`` says which was taken).
    Use :func:`estimate_kernels` for diagnostics and batches.
    """
    src = as_image_stack(source, "source", ndim=(2,))
    tgt = as_image_stack(target, "target", ndim=(2,))
    if src.shape != tgt.shape:
        raise InputError(f"source and target must have the same shape, got {src.shape} and {tgt.shape}")
    if mask is not None:
        mask = as_image_stack(mask, "mask", ndim=(2,))
        if mask.shape != tgt.shape:
            raise InputError(f"mask must have the images' shape {tgt.shape}, got {mask.shape}")
    check_kernel_size(kernel_size, tgt.shape)
    for name, img in (("source", src), ("target", tgt)):
        if not np.isfinite(np.asarray(img, dtype=np.float64)).any():
            raise InputError(f"{name} has no finite pixel (all NaN/inf); nothing to fit")
    finite_src = np.asarray(src, dtype=np.float64)
    finite_src = finite_src[np.isfinite(finite_src)]
    if np.all(finite_src == finite_src[0]):
        raise InputError(
            "source has no power: it is constant, so no kernel can be recovered; "
            "check that source and target are not swapped or blank"
        )
    result = estimate_kernels(
        src[None], tgt[None], kernel_size=kernel_size, method=method,
        options=options, mask=None if mask is None else mask[None], normalize=normalize, **option_keywords,
    )
    flag = int(result.flags[0])
    if flag & fl.BAD:
        raise InputError(
            f"no kernel could be estimated ({', '.join(fl.describe(flag & fl.BAD))}): "
            f"{result.n_valid[0]} usable pixels for a {kernel_size}x{kernel_size} kernel; "
            "mask fewer pixels, use a smaller kernel or a larger image"
        )
    return result.kernels[0]


def _options_doc(indent: str = "        ") -> str:
    lines = []
    for name, m in REGISTRY.items():
        text = f"``{name}`` (:class:`~pipeline.{m.options.__name__}`): {option_summary(m.options)}"
        lines.append(textwrap.fill(text, 88, initial_indent=indent, subsequent_indent=indent + "    "))
    return "\n".join(lines)


estimate_kernels.__doc__ = (estimate_kernels.__doc__ or "").replace("{options}", _options_doc())
