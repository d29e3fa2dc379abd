"""FITS files to an input stack: ``kernelmap ingest``.

One reference (the source) and many targets, each an image HDU (by index or
name) of a FITS file, plain or tile-compressed (``.fz``), are written to a
Zarr store that ``kernelmap run`` reads: ``source (y, x)``, ``target (image,
y, x)`` float32 (big-endian and ``BSCALE``/``BZERO``-scaled integers become
native floats), an optional ``mask (image, y, x)`` from each target's mask HDU
(the bits that count configurable; nonzero = bad), the header keys asked for
as coordinates along ``image`` and the reference's WCS as an attribute.
Targets must lie on the reference's pixel grid: their WCS maps the corners
and the centre of the image within ``tolerance`` pixels of the same pixels of
the reference, else the ingest stops before writing anything and says how far
apart they are.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OptionError

__all__ = ["FitsImage", "ingest_fits", "read_fits_image"]


@dataclass(frozen=True)
class FitsImage:
    """One image HDU read: native float32 pixels, its header, and the mask HDU's values where asked."""

    path: str
    data: np.ndarray
    header: Any
    mask: np.ndarray | None = None


def _hdu(hdus, which: int | str, path: str, what: str):
    try:
        hdu = hdus[which]
    except (KeyError, IndexError):
        names = [f"{i}: {h.name or '(no name)'}" for i, h in enumerate(hdus)]
        raise InputError(f"{path} has no {what} HDU {which!r} (it has {', '.join(names)}): set the HDU by index "
                         "or name") from None
    if hdu.data is None or np.ndim(hdu.data) != 2:
        raise InputError(f"{path}: HDU {which!r} holds no 2-D image (shape {np.shape(hdu.data)}): choose the HDU of "
                         "the image")
    return hdu


def read_fits_image(path: str | Path, *, hdu: int | str = 0, mask_hdu: int | str | None = None) -> FitsImage:
    """The image of ``hdu`` of a FITS file (``.fz`` tile-compressed ones too: their first image HDU where
    ``hdu`` is 0) as native float32 (scaled integers applied), with its header and the mask HDU's values."""
    from astropy.io import fits

    path = str(path)
    try:
        hdus = fits.open(path, memmap=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as FITS: {exc}") from None
    with hdus:
        which = hdu
        if hdu == 0 and hdus[0].data is None and len(hdus) > 1:  # a compressed or extension-only file
            which = 1
        image = _hdu(hdus, which, path, "image")
        data = np.asarray(image.data, dtype=np.float32)  # native byte order, BSCALE/BZERO applied
        mask = None
        if mask_hdu is not None:
            mask = np.asarray(_hdu(hdus, mask_hdu, path, "mask").data)
            if mask.shape != data.shape:
                raise InputError(f"{path}: the mask HDU {mask_hdu!r} is {mask.shape}, the image {data.shape}")
            mask = mask.astype(np.int64)
        return FitsImage(path, data, image.header.copy(), mask)


def _expanded(patterns: Sequence[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not found:
            raise InputError(f"no file matches {pattern!r}")
        files += found
    return files


def grid_offset(reference_header: Any, header: Any, shape: tuple[int, int]) -> float:
    """The largest distance in pixels between where ``header``'s WCS and the reference's put the corners
    and the centre of an image of ``shape`` on the sky (0 where neither has a celestial WCS)."""
    ref, other = _wcs(reference_header), _wcs(header)
    if not ref.has_celestial and not other.has_celestial:
        return 0.0
    if ref.has_celestial != other.has_celestial:
        return float("inf")
    ny, nx = shape
    x = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
    y = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    sky = other.celestial.pixel_to_world(x, y)
    rx, ry = ref.celestial.world_to_pixel(sky)
    return float(np.max(np.hypot(rx - x, ry - y)))


def _wcs_text(header: Any) -> str:
    """The header's WCS as FITS header text (empty without one)."""
    wcs = _wcs(header)
    return wcs.to_header().tostring(sep="\n") if wcs.has_celestial else ""


def _wcs(header: Any):
    """The header's WCS (astropy's notes on the header's keywords silenced)."""
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def ingest_fits(reference: str | Path, targets: Sequence[str | Path], output: str | Path, *, hdu: int | str = 0,
                mask_hdu: int | str | None = None, mask_bits: int | None = None, keys: Sequence[str] = (),
                tolerance: float = 0.01, chunk: int = 1024, mode: str = "create", attrs: dict[str, Any] | None = None,
                log=print) -> str:
    """Write the FITS ``reference`` and ``targets`` (paths or glob patterns) to a Zarr input stack at ``output``.

    ``mask_bits``: the bits of the mask HDU that mark a bad pixel (default: any).  ``keys``: header keys
    stored as coordinates along ``image`` (each target's; numbers as floats, others as text); ``attrs``:
    more root attributes.  Nothing is written before every file has been read and checked;
    ``mode="create"`` refuses an existing output.
    """
    import xarray as xr

    if mode not in ("create", "overwrite"):
        raise OptionError(f"mode={mode!r}: use 'create' or 'overwrite'")
    out = Path(output)
    if out.exists() and mode == "create":
        raise OptionError(f"{out} already exists: nothing was changed; use --overwrite (mode='overwrite') to "
                          "replace it, or another output path")
    files = _expanded([str(t) for t in targets])
    if not files:
        raise InputError("no target files given")
    ref = read_fits_image(reference, hdu=hdu)
    images = []
    for path in files:
        image = read_fits_image(path, hdu=hdu, mask_hdu=mask_hdu)
        if image.data.shape != ref.data.shape:
            raise InputError(f"{path} is {image.data.shape[0]}x{image.data.shape[1]} px, the reference "
                             f"{reference} {ref.data.shape[0]}x{ref.data.shape[1]}: the targets must be on the "
                             "reference's pixel grid (resample them onto it first)")
        offset = grid_offset(ref.header, image.header, image.data.shape)
        if offset > tolerance:
            raise InputError(f"{path} is not on the reference's pixel grid: its WCS puts the image's corners and "
                             f"centre up to {offset:.3g} px from the reference's (tolerance {tolerance:g} px); "
                             "resample it onto the reference grid first, or raise the tolerance")
        images.append(image)
    # text as variable-length strings (object arrays: what Zarr 3 specifies)
    coords: dict[str, Any] = {"image": ("image", np.array([Path(p).name.split(".")[0] for p in files], dtype=object))}
    for key in keys:
        values = [im.header.get(key) for im in images]
        missing = [im.path for im, v in zip(images, values) if v is None]
        if missing:
            raise InputError(f"header key {key!r} is missing in {missing[0]}"
                             + (f" and {len(missing) - 1} other file(s)" if len(missing) > 1 else "")
                             + ": give only keys every target has")
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        coords[key] = ("image", np.asarray(values, dtype=np.float64) if numeric
                       else np.array([str(v) for v in values], dtype=object))
    data = {"source": (("y", "x"), ref.data),
            "target": (("image", "y", "x"), np.stack([im.data for im in images]))}
    if mask_hdu is not None:
        bits = -1 if mask_bits is None else int(mask_bits)
        data["mask"] = (("image", "y", "x"), np.stack([(im.mask & bits) != 0 for im in images]).astype(np.uint8))
    ds = xr.Dataset(data, coords=coords, attrs={
        "title": "kernelmap input stack from FITS files", "reference": str(reference),
        "reference_wcs": _wcs_text(ref.header), "targets": [str(p) for p in files], **(attrs or {})})
    ny, nx = ref.data.shape
    encoding = {"source": {"chunks": (min(chunk, ny), min(chunk, nx))},
                "target": {"chunks": (1, min(chunk, ny), min(chunk, nx))}}
    if "mask" in data:
        encoding["mask"] = {"chunks": (1, min(chunk, ny), min(chunk, nx))}
    if out.exists():
        import shutil

        shutil.rmtree(out)
    ds.to_zarr(out, mode="w-", consolidated=False, zarr_format=3, encoding=encoding)
    log(f"ingest: {len(images)} target(s) and the reference written to {out}")
    return str(out)
