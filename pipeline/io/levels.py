"""Per-image numbers of the inputs: a number, a coordinate of the store or an attribute of the array.

Saturation levels (``input.saturation``), gains (``input.gain``) and read
noises (``input.read_noise``) are each given per image in one of three forms,
resolved here once, when the store is opened:

- a number: the same for every image;
- the name of a 1-D array of the store along the image axis (a coordinate,
  as xarray writes one from a FITS header keyword per image): one per image;
- the name of an attribute of the image array: a number, or a list with one
  per image.

A name is looked up first as a coordinate, then as an attribute; a shared 2-D
source has one value, a number or an attribute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..errors import InputError
from .arrays import (
    StoredImages,
    cf_decoding,
    close_names,
    lookup_member,
    name_listing,
    read_unit_shape,
    stored_dimension_names,
)

__all__ = ["ImageLevels", "resolve_levels", "check_range", "sample_images", "central_region"]


@dataclass(frozen=True, eq=False)
class ImageLevels:
    """One number per image of one input array (a saturation level, a gain, a read noise).

    Attributes
    ----------
    levels
        ``(n_images,)`` float64 for an ``(image, y, x)`` array, a 0-d array for a shared 2-D source.
    origin
        Where the values came from, for people: ``"60000"``, ``"coordinate 'SATURATE'"``, ...
    setting
        The value of the job key (a number or a name).
    """

    levels: np.ndarray
    origin: str
    setting: float | str

    def level(self, image: int | None) -> float:
        """The value of ``image`` (``None`` for a shared 2-D source)."""
        return float(self.levels if image is None or self.levels.ndim == 0 else self.levels[image])

    def describe(self) -> str:
        """``coordinate 'SATURATE' (58000 to 61000 over 3 images)``, ``attribute 'GAIN' of array 'target' = 1.5``."""
        lo, hi = float(np.min(self.levels)), float(np.max(self.levels))
        text = self.origin
        if not isinstance(self.setting, float):
            text += f" = {lo:g}" if lo == hi else f" ({lo:g} to {hi:g} over {self.levels.size} images)"
        return text

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable: the setting and the values (one number when all are equal)."""
        flat = self.levels.ravel()
        same = bool(flat.size) and bool(np.all(flat == flat[0]))
        levels: Any = float(flat[0]) if same else [float(v) for v in flat]
        return {"setting": self.setting, "levels": levels}


def resolve_levels(setting: Any, key: str, role: str, grp: zarr.Group, arr: StoredImages, where: str, n: int,
                   image_name: str, exclude: set[str], *, noun: str = "level",
                   units: str = "the units of the stored pixels") -> ImageLevels:
    """The values job key ``key`` names for ``role``: one per image of ``arr`` (one for a 2-D source).

    ``noun`` (``"level"``, ``"gain"`` ...) and ``units`` word the messages;
    ``exclude`` holds names that are no coordinates (the images, masks and
    variance arrays, the image coordinate).

    Raises
    ------
    InputError
        Naming ``key``: the setting is neither a finite number nor a name;
        no coordinate and no attribute has that name (listing those there and
        close names); the coordinate is not one number per image; the
        attribute is not a number or a list of one per image.
    """
    shape = () if arr.ndim == 2 else (n,)
    if isinstance(setting, (int, float, np.number)) and not isinstance(setting, (bool, np.bool_)):
        if not math.isfinite(setting):
            raise InputError(f"{key}: {setting!r} is not a finite number: give the {noun}, or none")
        return ImageLevels(np.full(shape, float(setting)), f"{float(setting):g}", float(setting))
    if not isinstance(setting, str) or not setting:
        raise InputError(f"{key}: {setting!r} is not a number or the name of a coordinate or attribute")
    name = setting
    node = None if name in exclude else lookup_member(grp, name)
    attrs = arr.array.attrs
    # a coordinate (one value per image) before an attribute, except for a shared source (one value)
    if name in attrs and (arr.ndim == 2 or not isinstance(node, zarr.Array)):
        return _attribute_levels(attrs[name], key, name, arr, n, noun)
    if isinstance(node, zarr.Array):
        return _coordinate_levels(node, name, key, role, arr, where, n, image_name, noun, units)
    coords = [c for c in sorted(grp.array_keys()) if c not in exclude and _along_images(grp[c], n)]
    attr_names = sorted(k for k in attrs if not k.startswith("_"))
    listed = ", ".join(attr_names[:20]) + (f" and {len(attr_names) - 20} more" if len(attr_names) > 20 else "")
    close = close_names(name, (coords if arr.ndim == 3 else []) + attr_names)
    what = f"'{name}' in {where} is a group, not a coordinate" if isinstance(node, zarr.Group) else \
        f"no coordinate '{name}' along the images in {where}"
    available = f"attributes of '{arr.name}': {listed or '(none)'}"
    if arr.ndim == 3:
        available = f"coordinates along '{image_name}' there: {name_listing(coords)}; {available}"
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
    raise InputError(f"{key}: {what}, and no attribute '{name}' of array '{arr.name}'; {available}{hint} "
                     f"Give one of those, or the {noun} as a number")


def _along_images(node: zarr.Array | zarr.Group, n: int) -> bool:
    return isinstance(node, zarr.Array) and node.ndim == 1 and node.shape[0] == n


def _coordinate_levels(node: zarr.Array, name: str, key: str, role: str, arr: StoredImages, where: str,
                       n: int, image_name: str, noun: str, units: str) -> ImageLevels:
    """One value per image from the 1-D array ``name`` of the store, along the image axis."""
    if arr.ndim == 2:
        raise InputError(
            f"{key}: '{name}' is an array of the input store (a {noun} per image), but {role} "
            f"'{arr.name}' is one 2-D reference shared by every target image, so it has one {noun}: give a "
            f"number, or the name of an attribute of array '{arr.name}'")
    dims = stored_dimension_names(node)
    if node.ndim != 1 or node.shape[0] != n:
        raise InputError(
            f"{key}: coordinate '{name}' in {where} has shape {tuple(node.shape)} but must be 1-D along "
            f"'{image_name}' with one {noun} per image ({n}); fix it, or give the {noun} as a number")
    if dims is not None and dims[0] is not None and dims[0] != image_name:
        raise InputError(
            f"{key}: coordinate '{name}' in {where} lies along '{dims[0]}', not along the image axis "
            f"'{image_name}': give a coordinate with one {noun} per image, or the {noun} as a number")
    if not (isinstance(node.dtype, np.dtype) and node.dtype.kind in "iuf"):
        raise InputError(
            f"{key}: coordinate '{name}' in {where} holds {node.dtype} values, not numbers: each {noun} must "
            f"be a number in {units}")
    raw = np.asarray(node[...])
    decoding = cf_decoding(node)
    values = (decoding(raw) if decoding is not None else raw).astype(np.float64)
    return ImageLevels(values, f"coordinate '{name}'", name)


def _attribute_levels(value: Any, key: str, name: str, arr: StoredImages, n: int, noun: str) -> ImageLevels:
    """The value(s) in attribute ``name`` of the array: one number, or one per image."""
    where = f"attribute '{name}' of array '{arr.name}'"

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(value):
        levels = np.full(() if arr.ndim == 2 else (n,), float(value))
    elif isinstance(value, list) and arr.ndim == 3 and len(value) == n and all(map(number, value)):
        levels = np.asarray(value, dtype=np.float64)
    else:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        per_image = "" if arr.ndim == 2 else f", or a list of {n} numbers (one per image)"
        raise InputError(
            f"{key}: {where} is {shown}, not a number{per_image}: fix the attribute, or give the {noun} "
            "as a number")
    return ImageLevels(levels, where, name)


def check_range(levels: ImageLevels, key: str, images: np.ndarray, *, noun: str = "level",
                above: float | None = None, at_least: float | None = None, units: str = "") -> None:
    """Raise unless every value is finite (and ``> above``, ``>= at_least`` when given).

    The message names ``key``, where the values came from, the images at
    fault (their labels) and the fix; ``units`` (e.g. ``" (electrons per
    ADU)"``) follows the rule in it.
    """
    values = levels.levels.ravel()
    rule = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values)
        if above is not None:
            ok &= values > above
        if at_least is not None:
            ok &= values >= at_least
    bad = np.flatnonzero(~ok)
    if not bad.size:
        return
    if levels.levels.ndim == 0:
        which = f"the shared source ({float(values[0]):g})"
    else:
        which = f"{bad.size} image(s) (" + ", ".join(
            f"{str(images[i])!r}" + ("" if rule == "" else f": {float(values[i]):g}") for i in bad[:5]
        ) + (" ..." if bad.size > 5 else "") + ")"
    raise InputError(
        f"{key}: {levels.origin} is not a finite number{rule} for {which}: every image needs a finite "
        f"{noun}{rule}{units}; fix those values, or give the {noun} as a number")


def sample_images(levels: np.ndarray, count: int) -> list[int | None]:
    """Images whose pixels are sampled to check their values: ``count`` evenly spaced ones and the lowest's.

    ``[None]`` for a shared 2-D source (``levels`` 0-d).
    """
    if levels.ndim == 0:
        return [None]
    n = levels.size
    picks = {int(i) for i in np.linspace(0, n - 1, min(n, count)).round()}
    picks.add(int(np.argmin(levels)))
    return sorted(picks)


def central_region(arr: StoredImages, image: int | None) -> tuple[np.ndarray, tuple[str, str]]:
    """The pixels of the stored read unit at the centre of ``image``, and where they lie (rows, columns)."""
    chunks = read_unit_shape(arr.array)
    ny, nx = arr.shape[-2:]
    cy, cx = (int(chunks[arr.order[-2]]), int(chunks[arr.order[-1]]))
    y0, x0 = (ny // 2) // cy * cy, (nx // 2) // cx * cx
    ys, xs = slice(y0, min(y0 + cy, ny)), slice(x0, min(x0 + cx, nx))
    return arr.read(image, ys, xs), (f"{ys.start}:{ys.stop}", f"{xs.start}:{xs.stop}")
