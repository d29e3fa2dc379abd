"""A kernel field applied to an image: the matched image and the difference image.

The matched image of a source under a kernel field ``K(y, x) = sum_p phi_p(y,
x) K_p`` (:class:`~pipeline.core.field.KernelField`) takes at each output
pixel the kernel of that pixel::

    M(y, x) = sum_(dy, dx) S(y - dy, x - dx) K_(y, x)(dy, dx)
            = sum_p phi_p(y, x) (S * K_p)(y, x)

one FFT convolution a term (the conventions' ``fftconvolve(source, K,
"same")``) and a sum weighted by the terms' polynomials at every pixel: the
kernel changes from pixel to pixel, so the matched image has no seams.  An
output pixel is NaN where the kernel's stamp around it reaches a bad (NaN)
source pixel or past the array: the pixels within ``k // 2`` of the image's
edges, or of a bad pixel.  Applied to overlapping pieces of an image (each
with ``k // 2`` pixels of its neighbours, NaN beyond the image, and its
``origin`` in the image) it gives the whole image's values exactly.

The difference image is ``target - source`` with both at the blurrier
image's PSF: the sharper image is the one convolved.  An image's kernels run
in its ``direction`` (the kernel map's per-image variable):

* ``1`` (forward, ``target = K * source + b``): the source is convolved,
  ``matched = K * source`` and ``difference = target - matched - background``;
* ``-1`` (reverse, ``source = K * target + b``: the target is the sharper):
  the target is convolved, ``matched = K * target`` and
  ``difference = matched - source - background``.

Either way what is new in the target shows positive and what is gone from it
negative.  The background is each tile's median of the difference before it
is subtracted (``target - matched``, or ``matched - source``: robust to what
changed; for a reversed image minus the fitted ``b``), interpolated
bilinearly between the tile centres, so the difference is sky-free.  Its
variance (:func:`difference_variance`) is ``V_target + K^2 * V_source``
forward and ``K^2 * V_target + V_source`` reverse.

Pure NumPy/SciPy.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.ndimage
from numpy.polynomial import legendre

from ..errors import OptionError
from .estimate import FORWARD, REVERSE
from .field import KernelField, polynomial_terms
from .tiles import tile_origins

__all__ = ["FORWARD", "REVERSE", "check_direction", "difference_image", "difference_variance",
           "interpolated_background", "matched_image", "matched_variance", "tile_background", "tile_median"]


def check_direction(direction: int) -> int:
    """``direction`` as ``FORWARD`` (1: the source convolved) or ``REVERSE`` (-1: the target convolved), the
    values of a kernel map's ``direction`` variable; an :class:`~pipeline.errors.OptionError` otherwise."""
    if isinstance(direction, (bool, np.bool_)) or not isinstance(direction, (int, np.integer)) \
            or int(direction) not in (FORWARD, REVERSE):
        raise OptionError(f"direction={direction!r}: use 1 (forward: the source convolved) or -1 (reverse: the "
                          "target convolved)")
    return int(direction)


def _bad_reach(bad: np.ndarray, half: int) -> np.ndarray:
    """Pixels whose ``(2 half + 1)``-square stamp holds a bad pixel or reaches past the array."""
    padded = np.pad(bad, half, constant_values=True)
    size = 2 * half + 1
    reach = scipy.ndimage.maximum_filter1d(padded.astype(np.uint8), size, axis=0)
    reach = scipy.ndimage.maximum_filter1d(reach, size, axis=1)
    return reach[half : half + bad.shape[0], half : half + bad.shape[1]].astype(bool)


def matched_image(source: np.ndarray, field: KernelField, *, origin: tuple[int, int] = (0, 0),
                  rows: int = 256) -> np.ndarray:
    """The source convolved with the kernel field, the kernel of each output pixel at that pixel.

    Parameters
    ----------
    source
        ``(ny, nx)`` pixels of the image convolved (the source; the target of
        a reversed image); NaN/inf are bad.
    field
        The kernel field (its kernels map the source onto the target, or for
        a reversed image the target onto the source).
    origin
        Position in the image of ``source[0, 0]`` (where ``source`` is a piece
        of it): the field is evaluated at image coordinates.
    rows
        Output rows whose terms' polynomials are evaluated at once (memory).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float64; NaN within the kernel's half-size of a bad pixel
        or of the array's edges.
    """
    coefficients = np.asarray(field.coefficients, dtype=np.float64)
    return _field_sum(source, coefficients, [(p,) for p in range(len(coefficients))], field, origin, rows)


def matched_variance(variance: np.ndarray, field: KernelField, *, origin: tuple[int, int] = (0, 0),
                     rows: int = 256) -> np.ndarray:
    """The variance the matched image (:func:`matched_image`) takes from independent source pixels of
    ``variance``: ``sum_(dy, dx) V(y - dy, x - dx) K_(y, x)(dy, dx)**2``, i.e. ``sum_(p, q) phi_p phi_q
    (V * (K_p K_q))`` (one FFT convolution a pair of terms).  NaN as in :func:`matched_image`."""
    coefficients = np.asarray(field.coefficients, dtype=np.float64)
    n = len(coefficients)
    pairs = [(p, q) for p in range(n) for q in range(p, n)]
    squares = np.stack([(1.0 if p == q else 2.0) * coefficients[p] * coefficients[q] for p, q in pairs])
    return _field_sum(variance, squares, pairs, field, origin, rows)


def _field_sum(image: np.ndarray, kernels: np.ndarray, terms: list[tuple[int, ...]], field: KernelField,
               origin: tuple[int, int], rows: int) -> np.ndarray:
    """``sum_i (prod_(p in terms[i]) phi_p) (image * kernels[i])``, NaN where a kernel's stamp reaches a bad
    (NaN) pixel of ``image`` or past the array."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"the image must be 2-D, got shape {image.shape}")
    bad = ~np.isfinite(image)
    out = _combined(_convolved(np.where(bad, 0.0, image), kernels), terms, field, origin, rows)
    out[_bad_reach(bad, kernels.shape[-1] // 2)] = np.nan
    return out


def _convolved(image: np.ndarray, kernels: np.ndarray) -> list[np.ndarray]:
    """``fftconvolve(image, kernel, "same")`` for each of the ``(n, k, k)`` ``kernels``, the image's
    transform taken once."""
    k = kernels.shape[-1]
    shape = tuple(scipy.fft.next_fast_len(n + k - 1, real=True) for n in image.shape)
    spectrum = scipy.fft.rfft2(image, shape)
    half = k // 2
    crop = (slice(half, half + image.shape[0]), slice(half, half + image.shape[1]))
    return [scipy.fft.irfft2(spectrum * scipy.fft.rfft2(kernel, shape), shape)[crop] for kernel in kernels]


def _combined(images: list[np.ndarray], terms: list[tuple[int, ...]], field: KernelField,
              origin: tuple[int, int], rows: int) -> np.ndarray:
    """``sum_i (prod_(p in terms[i]) phi_p) images[i]`` at every pixel, ``phi`` the field's terms at the
    image coordinates of pixels offset by ``origin``: each term ``P_a(u) P_b(v)`` is a column's value
    times a row's, so each image is weighted by an outer product, ``rows`` rows at a time."""
    ny, nx = images[0].shape
    u = (origin[1] + np.arange(nx, dtype=np.float64) - field.centre[1]) / field.scale[1]
    v = (origin[0] + np.arange(ny, dtype=np.float64) - field.centre[0]) / field.scale[0]
    lu, lv = legendre.legvander(u, field.degree), legendre.legvander(v, field.degree)  # (nx, d+1), (ny, d+1)
    powers = polynomial_terms(field.degree)
    out = np.zeros((ny, nx))
    scratch = np.empty((min(rows, ny), nx))
    for start in range(0, ny, rows):
        stop = min(start + rows, ny)
        band, work = out[start:stop], scratch[: stop - start]
        for term, image in zip(terms, images):
            column = np.prod([lu[:, powers[p][0]] for p in term], axis=0)  # (nx,)
            row = np.prod([lv[start:stop, powers[p][1]] for p in term], axis=0)  # (rows,)
            np.multiply(image[start:stop], column[None, :], out=work)
            work *= row[:, None]
            band += work
    return out


def tile_median(values: np.ndarray) -> float:
    """The median of the finite ``values`` (NaN where there is none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else np.nan


def interpolated_background(medians: np.ndarray, centres: tuple[np.ndarray, np.ndarray], ys: np.ndarray,
                            xs: np.ndarray) -> np.ndarray:
    """``(len(ys), len(xs))``: the tiles' ``medians`` (``(ty, tx)``, NaN where unknown: the nearest known
    one's value) interpolated bilinearly between the tile ``centres`` onto rows ``ys`` and columns ``xs``
    (constant beyond the outermost centres); NaN everywhere where no median is known."""
    medians = np.asarray(medians, dtype=np.float64)
    if not np.isfinite(medians).any():
        return np.full((len(ys), len(xs)), np.nan)
    rows = _interpolated(_filled(medians), centres[0], np.asarray(ys, dtype=np.float64), axis=0)
    return _interpolated(rows, centres[1], np.asarray(xs, dtype=np.float64), axis=1)


def tile_background(residual: np.ndarray, tile_size: int, *, step: int | None = None) -> np.ndarray:
    """A smooth background under ``residual`` (``target - matched``; ``matched - source`` for a reversed
    image): the median of each tile's finite pixels (the job's tile grid: a last row and column ending at
    the edges), interpolated bilinearly between the tile centres (:func:`interpolated_background`)."""
    residual = np.asarray(residual, dtype=np.float64)
    ny, nx = residual.shape
    step = tile_size if step is None else step
    y0, x0 = tile_origins(ny, tile_size, step), tile_origins(nx, tile_size, step)
    medians = np.array([[tile_median(residual[a : a + tile_size, b : b + tile_size]) for b in x0] for a in y0])
    centres = (y0 + (tile_size - 1) / 2, x0 + (tile_size - 1) / 2)
    return interpolated_background(medians, centres, np.arange(ny), np.arange(nx))


def difference_image(target: np.ndarray, source: np.ndarray, field: KernelField, *, tile_size: int,
                     step: int | None = None, background: float | np.ndarray | None = None,
                     direction: int = FORWARD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(difference, matched, background)`` of one pair, the sharper image convolved.

    ``direction`` ``1`` (forward): ``matched`` is the source convolved with
    ``field`` (:func:`matched_image`) and the difference ``target - matched -
    background``; ``-1`` (reverse, ``field``'s kernels map the target onto the
    source): ``matched`` is the target convolved and the difference
    ``matched - source - background``.  The background given, or (``None``)
    :func:`tile_background` of ``difference + background`` on tiles of
    ``tile_size`` every ``step`` pixels.  NaN where an image or the matched
    image is.
    """
    direction = check_direction(direction)
    target = np.asarray(target, dtype=np.float64)
    if target.shape != np.shape(source):
        raise ValueError(f"target {target.shape} and source {np.shape(source)} differ in shape")
    if direction == FORWARD:
        matched = matched_image(source, field)
        residual = target - matched
    else:
        matched = matched_image(target, field)
        residual = matched - np.asarray(source, dtype=np.float64)
    sky = tile_background(residual, tile_size, step=step) if background is None else \
        np.broadcast_to(np.asarray(background, dtype=np.float64), target.shape)
    return residual - sky, matched, np.asarray(sky)


def difference_variance(target_variance: np.ndarray, source_variance: np.ndarray, field: KernelField, *,
                        direction: int = FORWARD) -> np.ndarray:
    """The variance of :func:`difference_image`'s difference from independent pixels of the two images'
    variances: ``V_target + K^2 * V_source`` forward, ``K^2 * V_target + V_source`` reverse
    (:func:`matched_variance` for the convolved image)."""
    if check_direction(direction) == FORWARD:
        return np.asarray(target_variance, dtype=np.float64) + matched_variance(source_variance, field)
    return matched_variance(target_variance, field) + np.asarray(source_variance, dtype=np.float64)


def _filled(values: np.ndarray) -> np.ndarray:
    """NaN entries replaced by their nearest finite neighbour's value."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    _, (iy, ix) = scipy.ndimage.distance_transform_edt(bad, return_indices=True)
    return values[iy, ix]


def _interpolated(values: np.ndarray, at: np.ndarray, to: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` known at ``at`` along ``axis`` onto ``to`` (constant beyond)."""
    moved = np.moveaxis(values, axis, 0)
    if len(at) == 1:
        out = np.repeat(moved[:1], len(to), axis=0)
    else:
        position = np.clip(np.interp(to, at, np.arange(len(at), dtype=np.float64)), 0, len(at) - 1)
        low = np.minimum(np.floor(position).astype(np.int64), len(at) - 2)
        weight = (position - low)[:, None]
        out = moved[low] * (1 - weight) + moved[low + 1] * weight
    return np.moveaxis(out, 0, axis)
