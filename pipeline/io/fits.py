"""FITS files read for ``kernelmap ingest``: image, mask, weight and variance planes, headers and WCS.

An image is a 2-D HDU (by index or name) of a FITS file, plain or
tile-compressed (``.fz``); big-endian and ``BSCALE``/``BZERO``-scaled integers
become native float32.  Beside it, from HDUs of the same file or of other
files (:class:`Plane`), an optional mask (integer bit planes: the bits that
count are a setting, nonzero = bad; a floating-point mask is bad where nonzero
or NaN, and takes no bits: :func:`mask_bad_pixels`) and optional per-pixel weights (inverse variances;
0 = no data) or variances (0, NaN or inf = no data), both turned into float32
variances, a weight or variance of 0 an infinite variance (:func:`noise_variances`).

Everything about a file that can be known from its headers (that the HDUs
exist and hold 2-D images of one shape, the WCS, header keys) is read by
:func:`inspect_plane` without its pixels, so that a whole ingest is checked
before anything is written; :func:`read_image` then reads one image's pixels
and checks their values (no negative weight or variance).

The ingest itself (the stack, its tasks, resuming) is :mod:`pipeline.job.ingest`.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["FITS_SUFFIXES", "ImagePixels", "ImageSpec", "Plane", "celestial_wcs", "check_mask_bits",
           "check_plane_shape", "expand_files", "file_stem", "footprint_overlaps", "grid_offset", "inspect_plane",
           "mask_bad_pixels", "noise_variances", "plane_exists", "plane_file", "read_image", "wcs_text"]

#: Suffixes of FITS file names, stripped for ``{stem}`` (longest first).
FITS_SUFFIXES = (".fits.fz", ".fits.gz", ".fit.fz", ".fit.gz", ".fits", ".fit", ".fts", ".fz")


@dataclass(frozen=True)
class Plane:
    """Where one 2-D plane of an image is: a FITS file and its HDU (index or name).

    HDU 0 of a file whose primary HDU holds no data (a tile-compressed or
    extension-only file) is its first extension.  ``what`` names the plane in
    messages: ``image``, ``mask``, ``weight`` or ``variance``.
    """

    path: str
    hdu: int | str = 0
    what: str = "image"


@dataclass(frozen=True)
class ImageSpec:
    """The planes of one image: its pixels, and optionally its mask and its weights or variances."""

    image: Plane
    mask: Plane | None = None
    noise: Plane | None = None  #: its ``what`` says whether it holds weights or variances


@dataclass(frozen=True)
class ImagePixels:
    """One image's planes read: float32 pixels, the mask's bad pixels, float32 variances."""

    data: np.ndarray
    bad: np.ndarray | None = None  #: bool, True where the mask's counted bits are set; ``None`` without a mask
    variance: np.ndarray | None = None  #: NaN or inf = no data; ``None`` without weights or variances


def file_stem(path: str | os.PathLike[str]) -> str:
    """The file name without its FITS suffixes: ``epoch-1.fits.fz`` -> ``epoch-1``."""
    name = Path(path).name
    for suffix in FITS_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def plane_file(template: str, image_path: str | os.PathLike[str]) -> str:
    """The file of a plane from a template of the image file's path: ``{dir}`` (its folder, ``.`` for
    none), ``{name}`` (its file name) and ``{stem}`` (:func:`file_stem`).

    >>> plane_file("{dir}/{stem}.weight.fits", "data/epoch-1.fits.fz")
    'data/epoch-1.weight.fits'
    """
    path = Path(image_path)
    return template.format(dir=str(path.parent), name=path.name, stem=file_stem(path))


def expand_files(patterns: Sequence[str]) -> list[str]:
    """The files of paths and glob patterns, in order (each pattern's matches sorted)."""
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not found:
            raise InputError(f"no file matches {pattern!r}: check the pattern and its folder")
        files += found
    return files


def _open(path: str):
    """The opened HDU list of a FITS file: refused where it is missing, not a regular file (a folder, or a pipe,
    which would block the read), not FITS or shorter than its headers say."""
    from astropy.io import fits

    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; check the path")
    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "not a regular file (a pipe, socket or device)"
        raise InputError(f"{path} is {what}, not a FITS file: give the path of the FITS file itself")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdus = fits.open(path, memmap=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} cannot be read as FITS ({exc}): give a FITS file, plain or "
                             "tile-compressed") from None
    truncated = [w for w in caught if "truncated" in str(w.message)]
    if truncated:
        hdus.close()
        raise InputError(f"{path} is truncated ({truncated[0].message}): the file is shorter than its headers say; "
                         "copy it again from its source")
    for w in caught:  # astropy's other warnings, as they were given
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return hdus


def _select(hdus, plane: Plane):
    """The HDU of ``plane`` in the opened file, checked to hold a 2-D image (from its header alone)."""
    which = plane.hdu
    if which == 0 and hdus[0].header.get("NAXIS", 0) == 0 and len(hdus) > 1:  # compressed or extensions only
        which = 1
    try:
        hdu = hdus[which]
    except (KeyError, IndexError):
        names = [f"{i}: {h.name or '(no name)'}" for i, h in enumerate(hdus)]
        raise InputError(f"{plane.path} has no {plane.what} HDU {plane.hdu!r} (it has {', '.join(names)}): set "
                         f"the {plane.what} HDU by index or name") from None
    shape = tuple(getattr(hdu, "shape", None) or ()) if getattr(hdu, "is_image", False) else ()
    if len(shape) != 2:
        raise InputError(f"{plane.path}: HDU {which!r} holds no 2-D image (shape {shape}): choose the HDU of the "
                         f"{plane.what}")
    return hdu


def inspect_plane(plane: Plane) -> tuple[tuple[int, int], Any]:
    """``((ny, nx), header)`` of a plane, read from its header (no pixels)."""
    with _open(plane.path) as hdus:
        hdu = _select(hdus, plane)
        ny, nx = hdu.shape
        return (int(ny), int(nx)), hdu.header.copy()


def plane_exists(plane: Plane) -> bool:
    """Whether the plane's file exists and has its HDU (whatever it holds: :func:`inspect_plane` says)."""
    if not os.path.exists(plane.path):
        return False
    with _open(plane.path) as hdus:
        which = plane.hdu
        if which == 0:
            return True
        try:
            hdus[which]
        except (KeyError, IndexError):
            return False
        return True


def _pixels(plane: Plane, dtype) -> tuple[np.ndarray, Any]:
    """The plane's values as ``dtype`` (``None``: as stored, scaled, in native byte order) and its header."""
    with _open(plane.path) as hdus:
        hdu = _select(hdus, plane)
        try:
            data = np.asarray(hdu.data)  # BSCALE/BZERO applied
            data = data.astype(data.dtype.newbyteorder("=") if dtype is None else dtype)  # native byte order
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{plane.path}: the {plane.what} HDU {plane.hdu!r} cannot be read: {exc}") from None
        return data, hdu.header


def noise_variances(values: np.ndarray, kind: str, where: str = "") -> np.ndarray:
    """Float32 variances from weights (inverse variances) or variances.

    A weight of 0, NaN or inf becomes an infinite variance (no data: a bad
    pixel); so does a variance of 0 (it would weigh its pixel infinitely); a
    NaN or infinite variance stays as it is (a bad pixel too).

    Raises
    ------
    InputError
        A weight or variance is negative (``where`` names the plane).
    """
    if kind not in ("weight", "variance"):
        raise ValueError(f"kind={kind!r}: 'weight' or 'variance'")
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        negative = values < 0
    if negative.any():
        mark = "0" if kind == "weight" else "0, NaN or inf"
        raise InputError(f"{where or 'the ' + kind + 's'}: {int(negative.sum())} negative {kind}(s) (e.g. "
                         f"{float(values[negative].min()):g}): a {kind} is >= 0; set pixels without data to {mark} "
                         f"in the file, or give the {'variance' if kind == 'weight' else 'weight'} plane if that is "
                         "what it holds")
    if kind == "variance":
        return np.where(values == 0, np.inf, values).astype(np.float32)
    good = np.isfinite(values) & (values > 0)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(good, 1.0 / np.where(good, values, 1.0), np.inf).astype(np.float32)


def mask_bad_pixels(mask: np.ndarray, mask_bits: int | None = None, where: str = "the mask") -> np.ndarray:
    """Where a mask marks a pixel bad: an integer mask where any of ``mask_bits`` is set (any bit where
    ``None``); a float mask (floating-point or scaled values) where it is nonzero or NaN.

    Raises
    ------
    InputError
        ``mask_bits`` given with a float mask (``where`` names it): bits need integers.
    """
    mask = np.asarray(mask)
    if mask.dtype.kind == "f":
        if mask_bits is not None:
            raise InputError(_float_bits(where))
        return (mask != 0) | np.isnan(mask)  # NaN != 0 anyway: said for the reader
    if mask.dtype.kind == "b":
        return mask.copy()
    return (mask.astype(np.int64) & (-1 if mask_bits is None else int(mask_bits))) != 0


def _float_bits(where: str) -> str:
    return (f"{where} holds floating-point values, and mask bits need integers: remove mask_bits (--mask-bits) to "
            "take every nonzero or NaN value as bad, or give the HDU of an integer bit mask")


def float_plane(header: Any) -> bool:
    """Whether a plane's header says its values are read as floating-point: ``BITPIX`` < 0, or integers
    scaled by a ``BSCALE`` other than 1 or shifted by a ``BZERO`` that is not a whole number, or integers
    with a ``BLANK`` value (astropy reads those as floats, the blank pixels NaN)."""
    if int(header.get("BITPIX", 8)) < 0 or "BLANK" in header:
        return True
    bscale, bzero = float(header.get("BSCALE", 1.0)), float(header.get("BZERO", 0.0))
    return bscale != 1.0 or not bzero.is_integer()


def check_mask_bits(plane: Plane, header: Any, mask_bits: int | None) -> None:
    """Refuse ``mask_bits`` with a mask plane whose header says it is read as floats (:func:`float_plane`), or
    with bits above those its integers hold (``BITPIX``: 8 bits hold 0 to 255)."""
    if mask_bits is None:
        return
    if float_plane(header):
        raise InputError(_float_bits(f"{plane.path}, mask HDU {plane.hdu!r}"))
    width = abs(int(header.get("BITPIX", 8)))
    if int(mask_bits) >> width:
        raise InputError(
            f"{plane.path}, mask HDU {plane.hdu!r}: the mask bits {mask_bits} ({int(mask_bits):#x}) go beyond the "
            f"{width} bits of its integers (BITPIX {header.get('BITPIX', 8)}: at most {(1 << width) - 1:#x}), so "
            "those bits are never set and the pixels they would flag count as good: give the bits of this mask's "
            "flags (--mask-bits, mask_bits)")


def read_image(spec: ImageSpec, *, mask_bits: int | None = None) -> ImagePixels:
    """One image's pixels (native float32), its mask's bad pixels (:func:`mask_bad_pixels`: the bits in
    ``mask_bits``, any where ``None``; a float mask nonzero or NaN) and its float32 variances (from weights
    or variances: :func:`noise_variances`).

    Raises
    ------
    InputError
        A plane is missing, not 2-D, not shaped like the image, or holds negative weights or variances; a
        float mask with ``mask_bits``.
    """
    data, _ = _pixels(spec.image, np.float32)
    bad = variance = None
    if spec.mask is not None:
        mask, _ = _pixels(spec.mask, None)
        _same_shape(spec.mask, mask.shape, spec.image, data.shape)
        bad = mask_bad_pixels(mask, mask_bits, f"{spec.mask.path}, mask HDU {spec.mask.hdu!r}")
    if spec.noise is not None:
        values, _ = _pixels(spec.noise, np.float64)
        _same_shape(spec.noise, values.shape, spec.image, data.shape)
        variance = noise_variances(values, spec.noise.what,
                                   f"{spec.noise.path}, {spec.noise.what} HDU {spec.noise.hdu!r}")
    return ImagePixels(data, bad, variance)


def _same_shape(plane: Plane, shape: tuple[int, ...], image: Plane, image_shape: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(image_shape):
        raise InputError(f"{plane.path}: the {plane.what} HDU {plane.hdu!r} is {shape[0]}x{shape[1]} px, the "
                         f"image {image.path} {image_shape[0]}x{image_shape[1]}: give the {plane.what} plane of "
                         "this image")


def check_plane_shape(plane: Plane, image: Plane, image_shape: tuple[int, int]) -> Any:
    """Refuse a plane whose header says it is not shaped like its image (read from the headers); returns
    the plane's header."""
    shape, header = inspect_plane(plane)
    _same_shape(plane, shape, image, image_shape)
    return header


def grid_offset(reference_header: Any, header: Any, shape: tuple[int, int]) -> float:
    """The largest distance in pixels between where ``header``'s WCS and the reference's put the corners
    and the centre of an image of ``shape`` on the sky (0 where neither has a celestial WCS)."""
    ref, other = celestial_wcs(reference_header), celestial_wcs(header)
    if ref is None and other is None:
        return 0.0
    if ref is None or other is None:
        return float("inf")
    ny, nx = shape
    x = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
    y = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    rx, ry = ref.world_to_pixel(other.pixel_to_world(x, y))
    return float(np.max(np.hypot(rx - x, ry - y)))


def footprint_overlaps(reference_header: Any, reference_shape: tuple[int, int], header: Any,
                       shape: tuple[int, int]) -> bool:
    """Whether an image of ``shape`` with ``header``'s WCS covers any of the reference's pixels (its
    outline's bounding box in the reference's pixels against the reference's)."""
    ref, other = celestial_wcs(reference_header), celestial_wcs(header)
    ny, nx = shape
    t = np.linspace(0.0, 1.0, 9)
    x = np.concatenate([t * (nx - 1), np.full(9, nx - 1.0), t * (nx - 1), np.zeros(9)])
    y = np.concatenate([np.zeros(9), t * (ny - 1), np.full(9, ny - 1.0), t * (ny - 1)])
    rx, ry = ref.world_to_pixel(other.pixel_to_world(x, y))
    if not (np.isfinite(rx).all() and np.isfinite(ry).all()):
        return True  # let the resampling say
    ry_n, rx_n = reference_shape
    return bool(rx.max() >= -0.5 and rx.min() <= rx_n - 0.5 and ry.max() >= -0.5 and ry.min() <= ry_n - 0.5)


def wcs_text(header: Any) -> str:
    """The header's celestial WCS as FITS header text (empty without one)."""
    wcs = celestial_wcs(header)
    return "" if wcs is None else wcs.to_header().tostring(sep="\n")


def celestial_wcs(header: Any):
    """The header's celestial WCS (an ``astropy.wcs.WCS``; astropy's notes on the header's keywords
    silenced), or ``None`` without one."""
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header)
    return wcs.celestial if wcs.has_celestial else None
