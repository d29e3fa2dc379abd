"""Per-pixel variances of the inputs: arrays of the store, or the CCD model of gain and read noise.

For each image (the target, the source) its variance comes from one of:

- an array of the store shaped like the image: variances (``input.variance``)
  or weights, their inverses (``input.weight``; a weight of 0, NaN or inf is
  a NaN variance: a bad pixel of that image).  Names, dtypes and shapes are
  checked when the store is opened, values (no negative ones) as each block
  is read;
- the CCD model (``input.gain``, ``input.read_noise``): the variance of a
  pixel ``p`` (ADU) is ``max(p, 0) / gain + (read_noise / gain)**2``
  (:func:`pipeline.core.noise.ccd_variance`), computed from the image's own
  pixels as each block is read.  Gain (electrons per ADU) and read noise
  (electrons) are numbers, per-image coordinates or attributes
  (:mod:`pipeline.io.levels`), resolved and checked when the store is opened,
  together with a look at the pixels of a few images: a sky-subtracted image
  (or a gain in ADU per electron) scatters far more than the model says.

Not both for one image.  The reader returns the variances as float64 beside
the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ..core.noise import ccd_variance
from ..errors import InputError
from .arrays import (
    IMAGE_DIMS,
    StoredImages,
    axis_order,
    check_dtype,
    describe_array,
    get_array,
    stored_dimension_names,
    stored_images,
)
from .levels import ImageLevels, central_region, check_range, resolve_levels, sample_images

__all__ = ["CCDNoise", "Variances", "noise_spec", "ccd_spec", "open_variances"]

ROLES = ("target", "source")
#: Images whose central read unit is read to check the CCD model against the pixels' own scatter.
CCD_SAMPLE_IMAGES = 4
#: The pixel-to-pixel scatter may be up to this many times the noise the CCD model predicts at the median.
CCD_NOISE_RATIO = 3.0
#: Fewest finite neighbour differences in a sampled region for the check to judge it.
_CCD_MIN_SAMPLES = 64


@dataclass(frozen=True, eq=False)
class CCDNoise:
    """The CCD noise model of one image array: its gain and read noise, per image.

    Attributes
    ----------
    gain
        Electrons per ADU, one per image (one for a shared 2-D source).
    read_noise
        Electrons RMS; ``None`` when not given: 0, only the Poisson term.
    """

    gain: ImageLevels
    read_noise: ImageLevels | None = None

    def values(self, image: int | None) -> tuple[float, float]:
        """``(gain, read_noise)`` of ``image`` (``None`` for a shared 2-D source)."""
        return self.gain.level(image), 0.0 if self.read_noise is None else self.read_noise.level(image)

    def variance(self, image: int | None, pixels: np.ndarray) -> np.ndarray:
        """Float64 variances (ADU²) of ``pixels`` of ``image``: NaN where a pixel is not finite."""
        return ccd_variance(pixels, *self.values(image))

    def describe(self) -> str:
        """``gain coordinate 'GAIN' (1.5 to 1.6 over 2 images) e-/ADU, read noise 5 e-``."""
        noise = "0 e- (not given)" if self.read_noise is None else f"{self.read_noise.describe()} e-"
        return f"gain {self.gain.describe()} e-/ADU, read noise {noise}"

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable: the model and the values of the gain and the read noise."""
        return {"model": "ccd", "gain": self.gain.identity(),
                "read_noise": None if self.read_noise is None else self.read_noise.identity()}


@dataclass(frozen=True, eq=False)
class Variances:
    """Where the per-pixel variances of the target and the source come from: arrays or the CCD model.

    Attributes
    ----------
    kind
        ``"variance"`` or ``"weight"``: what the arrays hold (``variance = 1 /
        weight``; a weight of 0, NaN or inf is a bad pixel, a NaN variance);
        ``"variance"`` without arrays.
    target, source
        The stored arrays, shaped like the image they describe (``None``: not given).
    where
        The store, for messages.
    labels
        The image labels of the store's image coordinate, for messages (empty without one).
    ccd
        ``{role: CCDNoise}`` for the images whose variances come from the CCD model.
    """

    kind: str
    target: StoredImages | None
    source: StoredImages | None
    where: str = ""
    labels: tuple[str, ...] = ()
    ccd: dict[str, CCDNoise] = field(default_factory=dict)

    def given(self, role: str) -> bool:
        """Whether the variances of the ``role`` image are known."""
        return role in self.ccd or getattr(self, role) is not None

    def read(self, role: str, image: int, ys: slice, xs: slice, pixels: np.ndarray | None = None) -> np.ndarray | None:
        """Float64 variances ``[ys, xs]`` of ``image``'s ``role`` image (``None`` when not known).

        ``pixels`` are that image's pixels ``[ys, xs]`` as the reader returns
        them: the CCD model's variances are computed from them.

        Raises
        ------
        InputError
            Naming the array, the image and the region, where a value is negative.
        """
        if role in self.ccd:
            if pixels is None:
                raise ValueError(f"the {role}'s variances come from its pixels: pass them")
            return self.ccd[role].variance(image, pixels)  # one gain for a shared source, whatever the image
        arr: StoredImages | None = getattr(self, role)
        if arr is None:
            return None
        index = None if arr.ndim == 2 else image
        values = np.asarray(arr.read(index, ys, xs), dtype=np.float64)
        with np.errstate(invalid="ignore"):
            negative = values < 0
        if negative.any():
            self._negative(role, arr, index, ys, xs, values[negative])
        if self.kind == "variance":
            return values
        good = np.isfinite(values) & (values > 0)
        with np.errstate(divide="ignore"):
            return np.where(good, 1.0 / np.where(good, values, 1.0), np.nan)

    def _negative(self, role: str, arr: StoredImages, image: int | None, ys: slice, xs: slice,
                  values: np.ndarray) -> None:
        key = f"input.{self.kind}.{role}"
        if image is None:
            which = "the shared 2-D source"
        else:
            which = f"image {image}" + (f" ({self.labels[image]!r})" if image < len(self.labels) else "")
        ny, nx = arr.shape[-2:]
        (y0, y1, _), (x0, x1, _) = ys.indices(ny), xs.indices(nx)
        what = ("a variance is >= 0 (NaN or inf marks a bad pixel)" if self.kind == "variance"
                else "a weight (inverse variance) is >= 0 (0 marks a bad pixel)")
        raise InputError(
            f"{key}: array '{arr.name}' in {self.where} has {values.size} negative value(s) in {which}, "
            f"rows {y0}:{y1}, columns {x0}:{x1} (e.g. {float(values.min()):g}): {what}. Fix the array "
            f"(set such pixels to {'NaN' if self.kind == 'variance' else '0'} to mark them bad), or remove {key}")

    def describe(self) -> str:
        """``weights: target 'target_wht' float32 (image, y, x), source CCD model (gain 1.5 e-/ADU, ...)``."""
        parts = []
        for role in ROLES:
            arr: StoredImages | None = getattr(self, role)
            if role in self.ccd:
                parts.append(f"{role} CCD model ({self.ccd[role].describe()})")
            elif arr is None:
                parts.append(f"{role} none")
            else:
                parts.append(f"{role} '{arr.name}' {arr.dtype} {'(y, x)' if arr.ndim == 2 else '(image, y, x)'}")
        return f"{self.kind}s: " + ", ".join(parts)

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable: the kind and, for each image, its stored array's description or its CCD model."""
        def one(role: str) -> dict[str, Any] | None:
            arr: StoredImages | None = getattr(self, role)
            if role in self.ccd:
                return self.ccd[role].identity()
            return None if arr is None else describe_array(arr.name, arr.array, decoded=True)

        return {"kind": self.kind, "target": one("target"), "source": one("source")}


def noise_spec(variance: Mapping[str, Any] | None,
                weight: Mapping[str, Any] | None) -> tuple[str | None, dict[str, str | None]]:
    """``(kind, {role: name})`` from ``input.variance`` or ``input.weight``; ``(None, {})`` without either."""
    if variance is not None and weight is not None:
        raise InputError("input.weight: input.variance is given too: give the per-pixel variances (variance) "
                         "or their inverses (weight), not both; remove one of them")
    kind = "variance" if variance is not None else "weight" if weight is not None else None
    if kind is None:
        return None, {}
    spec = variance if variance is not None else weight
    key = f"input.{kind}"
    if not isinstance(spec, Mapping):
        raise InputError(f"{key} must be a mapping of target and source array names, got {spec!r}: "
                         f"e.g. {kind}: {{target: target_{kind[:3]}}}")
    unknown = sorted(set(spec) - {"target", "source"})
    if unknown:
        raise InputError(f"{key}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: target, source")
    names = {role: spec.get(role) for role in ("target", "source")}
    for role, name in names.items():
        if name is not None and (not isinstance(name, str) or not name):
            raise InputError(f"{key}.{role}: array names must be non-empty strings, got {name!r}")
    if all(name is None for name in names.values()):
        raise InputError(f"{key}: no array for the target or the source: give target and/or source, or "
                         f"remove {key}")
    return kind, names


def ccd_spec(gain: Mapping[str, Any] | None, read_noise: Mapping[str, Any] | None,
             arrays: Mapping[str, str | None], kind: str | None) -> dict[str, tuple[Any, Any]]:
    """``{role: (gain, read_noise)}`` from ``input.gain`` and ``input.read_noise`` (settings, not yet resolved).

    ``arrays`` and ``kind`` are the variance or weight arrays given (:func:`noise_spec`): an image takes
    its variances from one or the other.
    """
    settings: dict[str, dict[str, Any]] = {}
    for key, spec, number_ok in (("gain", gain, _positive), ("read_noise", read_noise, _non_negative)):
        if spec is None:
            settings[key] = {}
            continue
        if not isinstance(spec, Mapping):
            raise InputError(f"input.{key} must be a mapping of source and target values, got {spec!r}: e.g. "
                             f"{key}: {{target: {'GAIN' if key == 'gain' else 'RDNOISE'}, source: "
                             f"{'1.5' if key == 'gain' else '4.5'}}}")
        unknown = sorted(set(spec) - set(ROLES))
        if unknown:
            raise InputError(f"input.{key}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                             "target, source")
        settings[key] = {role: spec[role] for role in ROLES if spec.get(role) is not None}
        for role, value in settings[key].items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number, str)) or value == "":
                raise InputError(f"input.{key}.{role}: {value!r} is not a number or the name of a coordinate "
                                 "or attribute")
            if not isinstance(value, str):
                problem = number_ok(float(value))
                if problem:
                    raise InputError(f"input.{key}.{role}: {value!r} {problem}")
    out = {}
    for role in ROLES:
        g, rn = settings["gain"].get(role), settings["read_noise"].get(role)
        if rn is not None and g is None:
            raise InputError(_NO_GAIN.format(role=role))
        if g is None:
            continue
        if arrays.get(role) is not None:
            given = f"input.gain.{role}" + (f" and input.read_noise.{role}" if rn is not None else "")
            raise InputError(_BOTH.format(role=role, kind=kind, given=given))
        out[role] = (g, rn)
    return out


#: read noise without gain
_NO_GAIN = ("input.read_noise.{role}: no gain for the {role}: the CCD model needs the gain (electrons per ADU) to "
            "turn the read noise (electrons) into ADU; give input.gain.{role} too, or remove "
            "input.read_noise.{role}")
#: an array and the CCD model for one image
_BOTH = ("input.gain.{role}: input.{kind}.{role} is given too: the {role}'s variances come from its {kind} "
         "array or from its gain and read noise; give one: remove input.{kind}.{role} or {given}")


def _positive(value: float) -> str | None:
    if not math.isfinite(value):
        return "is not a finite number: give the gain in electrons per ADU"
    if value <= 0:
        return "is not > 0: give the gain in electrons per ADU (e.g. the GAIN keyword of a FITS header)"
    return None


def _non_negative(value: float) -> str | None:
    if not math.isfinite(value):
        return "is not a finite number: give the read noise in electrons RMS"
    if value < 0:
        return "is not >= 0: give the read noise in electrons RMS (0 for none)"
    return None


def open_variances(kind: str | None, spec: dict[str, str | None], ccd: dict[str, tuple[Any, Any]],
                   grp: zarr.Group, images_by_role: dict[str, StoredImages],
                   arrays: dict[str, tuple[str, zarr.Array]], where: str, group: str | None,
                   images: np.ndarray, labels: tuple[str, ...], image_name: str,
                   exclude: set[str]) -> Variances | None:
    """Open and check the variance or weight arrays ``spec`` names (names, dtypes, shapes), and resolve and
    check the CCD models ``ccd`` gives (values; the pixels of a few images); ``None`` when neither is given."""
    if kind is None and not ccd:
        return None
    used = {name: role for role, (name, _) in arrays.items()}
    values = "variances" if kind == "variance" else "weights"
    stored: dict[str, StoredImages | None] = {}
    for role in ROLES:
        name = spec.get(role)
        if name is None:
            stored[role] = None
            continue
        key = f"input.{kind}.{role}"
        if name in used:
            raise InputError(f"{key}: '{name}' is the {used[name]} array itself: give the array holding the "
                             f"{role}'s {values}")
        z = get_array(grp, name, key, where, group, suggest=True)
        check_dtype(z, name, key, where, allow_bool=False)
        image = images_by_role[role]
        stored[role] = _shaped_like(z, name, key, image, role, values, where)
    models = {}
    for role, (gain, read_noise) in ccd.items():
        arr = images_by_role[role]
        common = (role, grp, arr, where, len(images), image_name, exclude)
        g = resolve_levels(gain, f"input.gain.{role}", *common, noun="gain", units="electrons per ADU")
        check_range(g, f"input.gain.{role}", images, noun="gain", above=0, units=" (electrons per ADU)")
        rn = None
        if read_noise is not None:
            rn = resolve_levels(read_noise, f"input.read_noise.{role}", *common, noun="read noise",
                                units="electrons")
            check_range(rn, f"input.read_noise.{role}", images, noun="read noise", at_least=0,
                        units=" (electrons)")
        models[role] = CCDNoise(g, rn)
        _check_against_pixels(models[role], role, arr, images)
    return Variances(kind or "variance", stored["target"], stored["source"], where, labels, models)


def _check_against_pixels(model: CCDNoise, role: str, arr: StoredImages, images: np.ndarray) -> None:
    """Raise where the pixels of a sampled image scatter far more than ``model`` predicts at their median.

    The scatter is the robust spread of differences between horizontal
    neighbours, over sqrt(2): sources, gradients and defects barely move it,
    and correlated noise (a resampled image) only lowers it.
    A sky-subtracted image, or a gain in ADU per electron, scatters several
    times more than the model says.
    """
    for image in sample_images(model.gain.levels, CCD_SAMPLE_IMAGES):
        pixels, (rows, columns) = central_region(arr, image)
        pixels = pixels.astype(np.float64)
        diffs = np.diff(pixels, axis=-1)
        diffs = diffs[np.isfinite(diffs)]
        finite = pixels[np.isfinite(pixels)]
        if diffs.size < _CCD_MIN_SAMPLES:
            continue
        scatter = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2.0)
        median = float(np.median(finite))
        gain, read_noise = model.values(image)
        predicted = math.sqrt(float(ccd_variance(median, gain, read_noise)))
        if scatter <= CCD_NOISE_RATIO * predicted:
            continue
        label = "the shared source" if image is None else f"image {str(images[image])!r}"
        times = "infinitely many" if predicted == 0 else f"{scatter / predicted:.3g}"
        hints = ["the image is sky-subtracted (the Poisson term needs the sky the pixels counted: give the "
                 "images before sky subtraction, or their variances as input.variance)",
                 "the gain is in ADU per electron rather than electrons per ADU (then give 1/gain)"]
        if model.read_noise is None:
            hints.append(f"the read noise dominates and is missing (give input.read_noise.{role})")
        raise InputError(
            f"input.gain.{role}: the pixels of {label} scatter by {scatter:.4g} ADU (the robust spread of "
            f"neighbour differences in rows {rows}, columns {columns} of '{arr.name}'), {times} times the "
            f"{predicted:.4g} ADU that gain {gain:g} e-/ADU and read noise {read_noise:g} e- predict at their "
            f"median {median:.6g} ADU: the CCD model would much underrate the noise. Perhaps "
            + "; or ".join(hints) + f". Fix that, or give the variances as arrays instead of input.gain.{role}")


def _shaped_like(z: zarr.Array, name: str, key: str, image: StoredImages, role: str, values: str,
                 where: str) -> StoredImages:
    """``z`` as stored images, after checking it has the shape of ``image`` (the array it describes)."""
    shared = image.ndim == 2
    dims = "(y, x)" if shared else "(image, y, x)"
    if z.ndim != image.ndim:
        if shared:
            why = (f"the source '{image.name}' is one 2-D (y, x) image shared by every target image, so it has "
                   f"one variance per pixel: give a 2-D (y, x) array of shape {image.shape}, not one per image")
        elif z.ndim == 2:
            why = (f"{role} '{image.name}' holds one image per target image: give an (image, y, x) array of "
                   f"shape {image.shape}, one map of {values} per image")
        else:
            why = f"it must be {dims} like {role} '{image.name}', shape {image.shape}"
        raise InputError(f"{key}: array '{name}' in {where} has shape {tuple(z.shape)}, but {why}")
    arr = stored_images(z, name, axis_order(stored_dimension_names(z), IMAGE_DIMS[-z.ndim:]))
    if arr.shape != image.shape:
        raise InputError(
            f"{key}: array '{name}' in {where} has shape {arr.shape} as {dims} but {role} '{image.name}' has "
            f"{image.shape}: the {values} must cover every pixel of the {role} (the same images and pixel "
            "grid; the chunks may differ); resample or crop them to match")
    return arr
