"""Defects of real survey images, injected into a simulated image pair.

:func:`add_defects` corrupts copies of a source/target pair the way real
detector data are corrupted, and returns the truth: which pixels a perfect
user mask would mark. Four kinds of defect:

- scattered bad pixels (a fraction of each image, chosen at random): either
  flagged by the data themselves (NaN) or not (garbage values: hot pixels of
  ``1e4 .. 1e5`` ADU, or dead pixels that read 0 before the sky was
  subtracted, i.e. ``-sky``);
- one bad column (NaN, or hot) in the source, the target or both;
- saturation: every pixel at or above a level is set to that level, and the
  excess charge of each saturated run along a column bleeds up and down that
  column (the trail is set to the level too). Not NaN: blind data;
- cosmic-ray hits on the target: short sharp tracks (no PSF), 1-2 pixels wide
  and 1-15 pixels long, at random angles, with amplitudes of ``200 .. 20000``
  ADU per pixel (log-uniform). Not NaN either.

Each kind draws from its own random stream derived from ``seed``, so
switching one kind on or off leaves the others where they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.validate import check_int
from ..errors import InputError, OptionError

__all__ = ["Defects", "add_defects", "bleed_trails"]

#: Hot pixels (and hot columns) read this many ADU, uniformly.
HOT_RANGE = (1e4, 1e5)
#: Cosmic-ray amplitudes per pixel, ADU, log-uniform.
COSMIC_RAY_AMPLITUDE = (200.0, 20000.0)
#: Cosmic-ray track lengths, pixels, uniform.
COSMIC_RAY_LENGTH = (1.0, 15.0)

_COLUMN_CHOICES = (None, "source", "target", "both")
# independent random streams, one per kind of defect (their order is part of the results)
_STREAMS = ("source_pixels", "target_pixels", "column", "cosmic_rays")


@dataclass(frozen=True)
class Defects:
    """A corrupted image pair and the truth about its defects.

    Every array has the shape of the input images.

    Attributes
    ----------
    source, target
        Corrupted float64 copies of the inputs.
    source_bad, target_bad
        Defective pixels of each image: what a perfect user mask holds (the
        union of the maps below, and of any non-finite input pixel).
    source_pixels, target_pixels
        Scattered bad pixels (NaN, hot or dead).
    source_column, target_column
        The bad column, if any.
    source_saturated, target_saturated
        Saturated pixels: the cores (at or above the level before) and the
        bleed trails, all exactly at the level.
    source_bleed, target_bleed
        The bleed trails alone (pixels below the level before the charge
        spilled into them).
    cosmic_ray
        Pixels of the target hit by cosmic rays.
    """

    source: np.ndarray
    target: np.ndarray
    source_bad: np.ndarray
    target_bad: np.ndarray
    source_pixels: np.ndarray
    target_pixels: np.ndarray
    source_column: np.ndarray
    target_column: np.ndarray
    source_saturated: np.ndarray
    target_saturated: np.ndarray
    source_bleed: np.ndarray
    target_bleed: np.ndarray
    cosmic_ray: np.ndarray


def _fraction(value: object, name: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a fraction in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise OptionError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return v


def _image(array: object, name: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name} must be real, got dtype {arr.dtype}")
    return arr.astype(np.float64)  # always a copy


def _streams(seed: int | np.random.Generator) -> dict[str, np.random.Generator]:
    if isinstance(seed, np.random.Generator):
        children = seed.spawn(len(_STREAMS))
    else:
        try:
            sequence = np.random.SeedSequence(seed)
        except (TypeError, ValueError):
            raise OptionError(f"seed must be a non-negative integer or a Generator, got {seed!r}") from None
        children = [np.random.default_rng(s) for s in sequence.spawn(len(_STREAMS))]
    return dict(zip(_STREAMS, children))


def _garbage(rng: np.random.Generator, n: int, sky: float) -> np.ndarray:
    """``n`` values of unflagged bad pixels: half hot, half dead (``-sky``), at random."""
    hot = rng.random(n) < 0.5
    values = rng.uniform(*HOT_RANGE, n)
    values[~hot] = -sky
    return values


def bleed_trails(image: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Where the pixels at or above ``level`` are, and where their excess charge bleeds.

    Each maximal run of pixels at or above ``level`` along a column holds the
    excess ``sum(value - level)``; it spills into ``round(excess / level)``
    pixels of the same column, half of them (rounded down) above the run
    (smaller ``y``) and the rest below, clipped at the image's edges.

    Parameters
    ----------
    image
        2-D image, ADU (NaN pixels never saturate).
    level
        Saturation level, ADU, ``> 0``.

    Returns
    -------
    cores : numpy.ndarray
        bool, the pixels at or above ``level``.
    trails : numpy.ndarray
        bool, the pixels the excess charge spills into (disjoint from ``cores``).
    """
    img = np.asarray(image, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        cores = img >= level
    trails = np.zeros_like(cores)
    ny = img.shape[0]
    # run boundaries along each column, from the transposed image so that runs come column by column
    padded = np.zeros((img.shape[1], ny + 2), dtype=np.int8)
    padded[:, 1:-1] = cores.T
    step = np.diff(padded, axis=1)
    col_a, start = np.nonzero(step == 1)
    col_b, stop = np.nonzero(step == -1)  # exclusive
    assert np.array_equal(col_a, col_b)
    excess_rows = np.where(cores, img - level, 0.0).T
    cum = np.concatenate([np.zeros((img.shape[1], 1)), np.cumsum(excess_rows, axis=1)], axis=1)
    excess = cum[col_a, stop] - cum[col_a, start]
    length = np.floor(excess / level + 0.5).astype(np.intp)
    up = length // 2
    down = length - up
    for x, y0, y1, nu, nd in zip(col_a, start, stop, up, down):
        if nu:
            trails[max(y0 - nu, 0):y0, x] = True
        if nd:
            trails[y1:min(y1 + nd, ny), x] = True
    trails &= ~cores
    return cores, trails


def _cosmic_rays(rng: np.random.Generator, shape: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map and added charge of ``n`` cosmic-ray tracks on an image of ``shape``."""
    ny, nx = shape
    hit = np.zeros(shape, dtype=bool)
    charge = np.zeros(shape)
    lo, hi = COSMIC_RAY_AMPLITUDE
    for _ in range(n):
        y0 = rng.uniform(-0.5, ny - 0.5)
        x0 = rng.uniform(-0.5, nx - 0.5)
        length = rng.uniform(*COSMIC_RAY_LENGTH)
        angle = rng.uniform(0.0, math.pi)
        wide = rng.random() < 0.5
        amplitude = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        # pixels along the segment of `length` pixels (first to last pixel centre: length - 1)
        t = np.linspace(0.0, length - 1.0, max(2, int(math.ceil(4.0 * length))))
        dy, dx = math.sin(angle), math.cos(angle)
        ys = np.rint(y0 + t * dy).astype(np.intp)
        xs = np.rint(x0 + t * dx).astype(np.intp)
        if wide:  # a second row (or column) beside the track, across its main direction
            if abs(dx) >= abs(dy):
                ys, xs = np.concatenate([ys, ys + 1]), np.concatenate([xs, xs])
            else:
                ys, xs = np.concatenate([ys, ys]), np.concatenate([xs, xs + 1])
        inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
        track = np.zeros(shape, dtype=bool)
        track[ys[inside], xs[inside]] = True
        charge[track] += amplitude
        hit |= track
    return hit, charge


def add_defects(
    source: np.ndarray,
    target: np.ndarray,
    *,
    seed: int | np.random.Generator,
    bad_source: float = 0.0,
    bad_target: float = 0.0,
    bad_column: str | None = None,
    saturation: float | None = None,
    bleed: bool = True,
    cosmic_rays: int = 0,
    flag_bad: bool = True,
    sky: float = 1000.0,
) -> Defects:
    """Corrupt copies of an image pair with the defects of real survey data.

    In order: saturation (and bleeding) of both images, cosmic rays on the
    target (they saturate too), then the bad pixels and the bad column, which
    overwrite whatever was there.

    Parameters
    ----------
    source, target
        2-D real images of the same shape, ADU, sky-subtracted (e.g.
        :class:`pipeline.sim.scenes.SurveyPair`'s). Never modified.
    seed
        Integer seed or generator; the result is a function of it alone.
    bad_source, bad_target
        Probability of each pixel of the source (target) being bad. Bad pixels
        are NaN when ``flag_bad``; else each is, at random, hot (uniform in
        ``1e4 .. 1e5`` ADU, capped at ``saturation``) or dead (``-sky``).
    bad_column
        ``None``, ``"source"``, ``"target"`` or ``"both"``: one whole column
        (the same random ``x`` in both images) is bad: NaN when ``flag_bad``,
        else hot.
    saturation
        ``None``, or a level (ADU) for both images: pixels at or above it are
        set to it, and so are their bleed trails (see :func:`bleed_trails`)
        when ``bleed``. Not NaN: only the truth maps record them.
    bleed
        Whether saturated charge bleeds along the columns.
    cosmic_rays
        Number of cosmic-ray hits on the target (none on the source).
    flag_bad
        Bad pixels and columns are NaN (the data flag them), else garbage
        values (they do not).
    sky
        Sky level that was subtracted from the images, ADU: a dead pixel reads
        ``-sky``.

    Returns
    -------
    Defects
        The corrupted copies and the truth maps.

    Raises
    ------
    InputError
        If the images are not 2-D real arrays of one shape.
    OptionError
        If an option is out of range.
    """
    src = _image(source, "source")
    tgt = _image(target, "target")
    if src.shape != tgt.shape:
        raise InputError(f"source and target must have the same shape, got {src.shape} and {tgt.shape}")
    p_src = _fraction(bad_source, "bad_source")
    p_tgt = _fraction(bad_target, "bad_target")
    if bad_column not in _COLUMN_CHOICES:
        raise OptionError(f"bad_column must be one of {_COLUMN_CHOICES}, got {bad_column!r}")
    level: float | None = None
    if saturation is not None:
        try:
            level = float(saturation)
        except (TypeError, ValueError):
            raise OptionError(f"saturation must be None or a level in ADU, got {saturation!r}") from None
        if not (math.isfinite(level) and level > 0.0):
            raise OptionError(f"saturation must be a finite level > 0, got {saturation!r}")
    n_rays = check_int("cosmic_rays", cosmic_rays, 0)
    try:
        sky = float(sky)
    except (TypeError, ValueError):
        raise OptionError(f"sky must be a number, got {sky!r}") from None
    if not (math.isfinite(sky) and sky >= 0.0):
        raise OptionError(f"sky must be finite and >= 0, got {sky!r}")
    rng = _streams(seed)
    shape = src.shape
    nothing = np.zeros(shape, dtype=bool)
    bad_in = {"source": ~np.isfinite(src), "target": ~np.isfinite(tgt)}

    # saturation and bleeding, on what the detector recorded
    saturated = {"source": nothing.copy(), "target": nothing.copy()}
    bleeding = {"source": nothing.copy(), "target": nothing.copy()}
    if level is not None:
        for name, img in (("source", src), ("target", tgt)):
            cores, trails = bleed_trails(img, level)
            if not bleed:
                trails = nothing.copy()
            img[cores | trails] = level
            saturated[name] = cores | trails
            bleeding[name] = trails

    # cosmic rays on the target: sharp extra charge, saturating like the rest
    ray, charge = _cosmic_rays(rng["cosmic_rays"], shape, n_rays)
    tgt += charge
    if level is not None:
        over = ray & (tgt >= level)
        tgt[over] = level
        saturated["target"] |= over

    # scattered bad pixels and the bad column overwrite everything
    pixels = {}
    for name, img, p in (("source", src, p_src), ("target", tgt, p_tgt)):
        stream = rng[f"{name}_pixels"]
        hit = stream.random(shape) < p
        n = int(hit.sum())
        values = np.full(n, np.nan) if flag_bad else _garbage(stream, n, sky)
        img[hit] = values if level is None else np.minimum(values, level)  # NaN stays NaN
        pixels[name] = hit
    x = int(rng["column"].integers(shape[1]))
    hot = rng["column"].uniform(*HOT_RANGE, shape[0])
    column = {}
    for name, img in (("source", src), ("target", tgt)):
        col = nothing.copy()
        if bad_column in (name, "both"):
            col[:, x] = True
            img[:, x] = np.nan if flag_bad else (hot if level is None else np.minimum(hot, level))
        column[name] = col

    bad = {name: bad_in[name] | pixels[name] | column[name] | saturated[name] for name in ("source", "target")}
    bad["target"] = bad["target"] | ray
    return Defects(
        source=src, target=tgt, source_bad=bad["source"], target_bad=bad["target"],
        source_pixels=pixels["source"], target_pixels=pixels["target"],
        source_column=column["source"], target_column=column["target"],
        source_saturated=saturated["source"], target_saturated=saturated["target"],
        source_bleed=bleeding["source"], target_bleed=bleeding["target"],
        cosmic_ray=ray,
    )
