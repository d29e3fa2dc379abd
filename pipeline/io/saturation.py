"""Saturation levels of the inputs (``input.saturation``): resolved, checked, applied as each block is read.

Pixels at or above an image's level, widened by ``grow`` pixels
(:mod:`pipeline.core.saturation`), are set to NaN in the copies the reader
returns.  A level is a number, a per-image coordinate of the store or an
attribute of the array (:mod:`pipeline.io.levels`); levels are resolved and
checked when the store is opened, against the median of a few images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..core.saturation import halo, mask_saturated
from ..errors import InputError
from .arrays import StoredImages
from .levels import ImageLevels, central_region, check_range, resolve_levels, sample_images

__all__ = ["Saturation", "SaturationLevels", "saturation_levels", "mask_dtype", "read_saturated"]

#: Images whose central chunk is read to check their saturation level against their median.
SATURATION_SAMPLE_IMAGES = 4


@dataclass(frozen=True, eq=False)
class SaturationLevels(ImageLevels):
    """The upper valid levels of one input array, and the medians of the images sampled to check them.

    Attributes
    ----------
    medians
        ``(image index or None, median)`` of the images sampled to check the levels.
    """

    medians: tuple[tuple[int | None, float], ...] = ()

    def describe(self) -> str:
        """``coordinate 'SATURATE' (58000 to 61000 over 3 images; sampled medians 96 to 130)``."""
        text = super().describe()
        meds = [m for _, m in self.medians if math.isfinite(m)]
        if meds:
            low, high = min(meds), max(meds)
            what = f"median {low:.4g}" if len(meds) == 1 else f"medians {low:.4g} to {high:.4g}"
            text += f"; sampled {what}"
        return text


@dataclass(frozen=True, eq=False)
class Saturation:
    """Saturation levels of the source and the target (``None``: no limit) and the widening in pixels."""

    source: SaturationLevels | None
    target: SaturationLevels | None
    grow: int = 1

    def describe(self) -> str:
        """One line for the dry run."""
        parts = [f"{role} >= {levels.describe()}" if levels is not None else f"{role} no limit"
                 for role, levels in (("target", self.target), ("source", self.source))]
        return "; ".join(parts) + f"; bad areas grown by {self.grow} px"

    def identity(self) -> dict[str, Any]:
        return {"grow": self.grow,
                **{role: None if lv is None else lv.identity()
                   for role, lv in (("source", self.source), ("target", self.target))}}


def saturation_levels(spec: Mapping[str, Any], grp: zarr.Group, stored: dict[str, StoredImages], where: str,
                images: np.ndarray, image_name: str, *, exclude: set[str]) -> Saturation:
    """Resolve and check ``input.saturation`` against the opened store."""
    if not isinstance(spec, Mapping):
        raise InputError(f"input.saturation must be a mapping of source, target and grow, got {spec!r}")
    unknown = sorted(set(spec) - {"source", "target", "grow"})
    if unknown:
        raise InputError(f"input.saturation: unknown key(s) {', '.join(map(repr, unknown))}; "
                         "allowed keys: source, target, grow")
    grow = spec.get("grow", 1)
    if isinstance(grow, bool) or not isinstance(grow, (int, np.integer)) or grow < 0:
        raise InputError(f"input.saturation.grow: {grow!r} is not an integer >= 0: give the radius in pixels "
                         "by which saturated areas are widened (0: only the pixels at or above the level)")
    resolved = {}
    for role in ("source", "target"):
        setting = spec.get(role)
        if setting is None:
            resolved[role] = None
            continue
        levels = resolve_levels(setting, f"input.saturation.{role}", role, grp, stored[role], where,
                                len(images), image_name, exclude)
        resolved[role] = _checked_levels(levels, role, stored[role], images)
    return Saturation(resolved["source"], resolved["target"], int(grow))


def _checked_levels(levels: ImageLevels, role: str, arr: StoredImages,
                    images: np.ndarray) -> SaturationLevels:
    """``levels`` after checking they are finite and above the median of a few images (their medians kept)."""
    key = f"input.saturation.{role}"
    check_range(levels, key, images)
    medians = []
    origin = "" if isinstance(levels.setting, float) else f" ({levels.origin})"
    if arr.decoding is None and arr.dtype.kind in "iu" and float(np.min(levels.levels)) > np.iinfo(arr.dtype).max:
        largest = np.iinfo(arr.dtype).max
        raise InputError(
            f"{key}: the level {float(np.min(levels.levels)):g}{origin} is above {largest}, the largest value "
            f"the {arr.dtype} array '{arr.name}' can hold: no pixel can reach it, so it is probably in other units "
            "than the stored pixels (e.g. electrons rather than ADU). Give the level in the units of the stored "
            f"values (at most {largest}), or remove {key}")
    for image in sample_images(levels.levels, SATURATION_SAMPLE_IMAGES):
        median, region = _central_median(arr, image)
        medians.append((image, median))
        level = levels.level(image)
        if math.isfinite(median) and level <= median:
            label = "the shared source" if image is None else f"image {str(images[image])!r}"
            raise InputError(
                f"{key}: the level {level:g}{origin} of {label} is at or below its median pixel "
                f"value {median:.6g} (sampled in rows {region[0]}, columns {region[1]} of '{arr.name}'): "
                "at least half of its pixels would be bad, so the level is probably in other units than "
                "the stored pixels (e.g. electrons rather than ADU, or before a scale_factor/add_offset "
                f"the store applies). Give the level in the units of the stored values, or remove {key}")
    return SaturationLevels(levels.levels, levels.origin, levels.setting, medians=tuple(medians))


def _central_median(arr: StoredImages, image: int | None) -> tuple[float, tuple[str, str]]:
    """NaN-ignoring median of the stored read unit at the centre of ``image``, and where it lies."""
    values, region = central_region(arr, image)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    return (float(np.median(finite)) if finite.size else math.nan), region


def mask_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of values with saturated pixels as NaN: floats keep theirs, others become float64."""
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def read_saturated(arr: StoredImages, image: int | None, ys: slice, xs: slice, level: float,
                    grow: int) -> np.ndarray:
    """Pixels ``[ys, xs]`` with the saturated ones NaN, read with a halo of ``grow`` pixels."""
    ny, nx = arr.shape[-2:]
    y0, y1, _ = ys.indices(ny)
    x0, x1, _ = xs.indices(nx)
    read_y, keep_y = halo(y0, max(y0, y1), grow, ny)
    read_x, keep_x = halo(x0, max(x0, x1), grow, nx)
    values = arr.read(image, read_y, read_x)
    return mask_saturated(values, level, grow)[keep_y, keep_x]

