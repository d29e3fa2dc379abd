"""Reading kernel maps: per-tile measurements and the smooth kernel-field model, anywhere.

>>> km = KernelMap.open("kernels.zarr")
>>> km.kernel_at("epoch-1", y=1000.0, x=2500.5)       # (k, k) model kernel there
>>> ds = km.ds; ds.kernelmap.fwhm_map(model=True)     # the same through the xarray accessor

The ``kernelmap`` accessor on :class:`xarray.Dataset` is registered when this
module is imported, which ``import pipeline`` arranges for as soon as xarray is
imported (see :mod:`pipeline.analysis.hook`).  Both forms take the same
arguments and raise the same errors: :class:`~pipeline.errors.InputError` for a
dataset or store that is not a kernel map and for an image it does not hold,
:class:`~pipeline.errors.OutsideImageError` for a position outside the image
(:func:`map_extent`; ``outside="nan"`` gives NaN kernels there and a warning).

Directions: each image's kernels go one way, its ``direction`` variable
(:func:`image_directions`, ``+1``/``-1``; a store written before it existed is
all forward).  Forward (``+1``): ``target = kernel * source + background``, the
kernel blurs the source.  Reverse (``-1``, the target was the sharper image):
``source = kernel * target + background``, the kernel blurs the target, its sum
is the flux ratio source/target and the background is in the source's units.
Every kernel this module returns is in its image's own direction; where images
of both directions are evaluated together (:func:`model_kernels_at`,
:meth:`KernelMap.model_kernels`) the directions come with them or a
``direction=`` keyword keeps to one and refuses the others.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import xarray as xr

from .. import flags as fl
from ..core.estimate import FORWARD, REVERSE
from ..core.field import STORED, KernelField, check_positions, image_extent, polynomial_terms
from ..core.moments import adaptive_moments
from ..errors import InputError, OptionError, unreadable_store

__all__ = ["DIRECTION_NAMES", "FORWARD", "REVERSE", "KernelMap", "KernelMapAccessor", "decode_flags",
           "direction_names", "image_directions", "map_extent", "model_kernels_at", "read_kernel_map"]

#: Name of each direction value, as the survey table and the report write it.
DIRECTION_NAMES = {FORWARD: "forward", REVERSE: "reverse", 0: "undecided"}
#: Values of the ``direction=`` keyword of :func:`model_kernels_at` and :meth:`KernelMap.model_kernels`.
DIRECTION_CHOICES = (None, "forward", "reverse")


#: Variables every kernel map has: what the report and the comparison read.
MEASURED = ("kernel", "fwhm", "quality_flag", "image")
#: Variables :class:`KernelMap` needs besides the kernels: the stored kernel-field model.
MODEL = ("model_coefficient", "model_degree")


def _open_store(path: str | os.PathLike[str], **kwargs: Any) -> xr.Dataset:
    """A Zarr store opened lazily; an :class:`~pipeline.errors.InputError` when it cannot be."""
    where = os.fspath(path)
    try:
        with warnings.catch_warnings():  # a store without consolidated metadata is read all the same
            warnings.simplefilter("ignore", RuntimeWarning)
            return xr.open_zarr(where, **kwargs)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise InputError(f"cannot open {where} as a Zarr store ({exc}): give the output.path of a "
                         "kernelmap run") from exc
    except Exception as exc:  # unreachable, not readable, or the object store's own error
        raise unreadable_store(exc, where, named="the kernel map", options="--storage-options") from exc


def _require(ds: xr.Dataset, names: tuple[str, ...], where: str | None) -> None:
    """An :class:`~pipeline.errors.InputError` naming what a kernel map lacks (``where``: its store, if any)."""
    missing = [name for name in names if name not in ds.variables]
    if not missing:
        return
    if where is None:
        raise InputError(f"not a kernelmap kernel map: no {', '.join(missing)} in the dataset")
    raise InputError(f"{where} is not a kernelmap kernel map (no {', '.join(missing)}): give the "
                     "output.path of a kernelmap run")


def read_kernel_map(path: str | os.PathLike[str], *, lazy: tuple[str, ...] = (),
                    storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """A kernel-map store's Dataset, loaded; an :class:`~pipeline.errors.InputError` naming the
    problem when ``path`` is not a Zarr store or not a kernel map.

    Variables named in ``lazy`` (e.g. ``("kernel",)``, the bulk of a large stack) stay lazy: read
    only what of them is indexed.  ``storage_options``: fsspec's, for a store at a URL.
    """
    ds = _open_store(path, **({"storage_options": storage_options} if storage_options else {}))
    _require(ds, MEASURED, os.fspath(path))
    if not lazy:
        return ds.load()
    eager = [name for name in ds.variables if name not in lazy]
    return ds.assign({name: ds[name].load() for name in eager if name in ds.data_vars}).assign_coords(
        {name: ds[name].load() for name in eager if name in ds.coords})


def image_directions(ds: xr.Dataset) -> np.ndarray:
    """``(n_images,)`` int8: each image's direction, :data:`FORWARD` (``+1``: the kernel blurs the source)
    or :data:`REVERSE` (``-1``: it blurs the target), 0 for an image a run has not reached yet; a kernel map
    written before directions existed (no ``direction`` variable) is all forward."""
    n = ds.sizes["image"]
    if "direction" not in ds.variables:
        return np.full(n, FORWARD, dtype=np.int8)
    values = np.asarray(ds["direction"].values)
    if values.shape != (n,):
        raise InputError(f"the kernel map's direction variable has shape {values.shape}, not ({n},): it is not "
                         "a kernelmap kernel map's")
    return values.astype(np.int8)


def direction_names(directions: np.ndarray) -> np.ndarray:
    """``"forward"``, ``"reverse"`` (or ``"undecided"`` for 0) for each of ``directions``."""
    return np.array([DIRECTION_NAMES.get(int(d), "undecided") for d in np.asarray(directions).ravel()],
                    dtype=object).reshape(np.shape(directions))


def _check_option(direction: object) -> None:
    if direction not in DIRECTION_CHOICES:
        raise OptionError(f"direction={direction!r} is not known: use None (each image in its own direction), "
                          "'forward' or 'reverse'")


def _check_direction(ds: xr.Dataset, pick: Any, direction: str | None) -> None:
    """Refuse (:class:`~pipeline.errors.OptionError`, :class:`~pipeline.errors.InputError`) images picked
    by ``pick`` that are not of ``direction`` (``None``: any)."""
    _check_option(direction)
    if direction is None:
        return
    want = FORWARD if direction == "forward" else REVERSE
    index = np.arange(ds.sizes["image"])[pick]
    other = np.atleast_1d(index)[np.atleast_1d(image_directions(ds)[pick]) != want]
    if other.size:
        labels = [str(v) for v in np.asarray(ds["image"].values)[other][:5]]
        raise InputError(f"direction={direction!r}, but {other.size} of the images asked for are not {direction} "
                         f"({', '.join(labels)}{' ...' if other.size > 5 else ''}): their kernels blur the other "
                         f"image of the pair; pick the {direction} images (image_directions(ds) == {want}), or "
                         "pass direction=None to get each image's kernels in its own direction")


def model_kernels_at(ds: xr.Dataset, y: Any, x: Any, images: Any = None, *, outside: str = "raise",
                     direction: str | None = None) -> np.ndarray:
    """Model kernels of many images at once: ``(n_images, *shape, k, k)`` at positions ``(y, x)``
    (broadcast to ``shape``), NaN for an image without a model (``model_degree < 0``).

    ``images``: positions along ``image`` (default: all).  The same kernels as
    :meth:`KernelMap.kernel_at` image by image, evaluated for every image in one product; positions
    outside the image raise or, with ``outside="nan"``, get NaN kernels and a warning, as there.

    Each image's kernels are in its own direction (:func:`image_directions`: a reverse image's blur the
    target, not the source), so the images of a mixed stack do not compare kernel for kernel: with
    ``direction="forward"`` (or ``"reverse"``) every image asked for must be of that direction, else an
    :class:`~pipeline.errors.InputError` names those that are not; ``None`` (the default) takes each
    image as it is: read ``image_directions(ds)[images]`` beside the result.
    """
    _require(ds, (*MODEL, "model_centre_y", "model_centre_x", "model_scale_y", "model_scale_x"), None)
    pick = slice(None) if images is None else np.asarray(images, dtype=np.int64)
    _check_direction(ds, pick, direction)
    away = check_positions(y, x, map_extent(ds), outside, stacklevel=3)
    degree = np.asarray(ds["model_degree"].values[pick]).astype(np.int64)
    coef = np.asarray(ds["model_coefficient"].values[pick], dtype=np.float64)  # (n, term, k, k)
    n, n_terms, k = coef.shape[0], coef.shape[1], coef.shape[-1]
    top = next(d for d in range(n_terms) if len(polynomial_terms(d)) >= n_terms)
    terms = polynomial_terms(top)[:n_terms]
    used = np.arange(n_terms)[None, :] < np.array([len(polynomial_terms(d)) if d >= 0 else 0 for d in degree])[:, None]
    coef = np.where(used[:, :, None, None], np.nan_to_num(coef), 0.0).reshape(n, n_terms, k * k)
    yb, xb = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
    shape = yb.shape
    cy, cx, sy, sx = (np.asarray(ds[name].values[pick], dtype=np.float64)[:, None]
                      for name in ("model_centre_y", "model_centre_x", "model_scale_y", "model_scale_x"))
    with np.errstate(invalid="ignore", divide="ignore"):
        u, v = (xb.ravel()[None, :] - cx) / sx, (yb.ravel()[None, :] - cy) / sy  # (n, p)
    lu, lv = np.polynomial.legendre.legvander(u, top), np.polynomial.legendre.legvander(v, top)
    design = np.stack([lu[..., i] * lv[..., j] for i, j in terms], axis=-1)  # (n, p, term)
    values = np.einsum("npt,ntq->npq", design, coef, optimize=True)
    values[degree < 0] = np.nan
    values[:, away.ravel()] = np.nan
    return values.reshape(n, *shape, k, k)


def map_extent(ds: xr.Dataset) -> tuple[float, float, float, float]:
    """``(y_min, y_max, x_min, x_max)`` of the images a kernel map was made from (pixel centres at integers).

    From the ``input_shape`` attribute; for a store written before it existed, from the target's shape in
    ``kernelmap_input``; failing both, the pixels its tiles cover (from ``tile_size``), else its tile centres.
    """
    attrs = ds.attrs
    shape = attrs.get("input_shape")
    if shape is None:
        shape = _input_shape(attrs.get("kernelmap_input"))
    if shape is not None:
        return image_extent(int(shape[0]), int(shape[1]))
    y, x = np.asarray(ds["y"].values, dtype=np.float64), np.asarray(ds["x"].values, dtype=np.float64)
    half = (float(attrs["tile_size"]) - 1) / 2 + 0.5 if "tile_size" in attrs else 0.0
    return (float(y.min()) - half, float(y.max()) + half, float(x.min()) - half, float(x.max()) + half)


def _input_shape(identity: Any) -> tuple[int, int] | None:
    """``(ny, nx)`` of the target as recorded in a store's ``kernelmap_input`` (``None`` where not there)."""
    from ..io.arrays import IMAGE_DIMS, axis_order

    try:
        target = json.loads(identity)["arrays"]["target"]
        shape, names = target["shape"], target.get("dimension_names")
        order = axis_order(None if names is None else tuple(names), IMAGE_DIMS)
        return int(shape[order[1]]), int(shape[order[2]])
    except (TypeError, ValueError, KeyError, IndexError):
        return None


class KernelMap:
    """A kernel-map Dataset (as written by ``kernelmap run``) with its analysis verbs."""

    def __init__(self, ds: xr.Dataset, path: str | None = None):
        _require(ds, ("kernel", *MODEL), path)
        self.ds = ds
        self.path = path  #: the store it was opened from, if any

    @classmethod
    def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> KernelMap:
        """Open a kernel-map store (lazily, with :func:`xarray.open_zarr`; ``kwargs`` go to it)."""
        return cls(_open_store(path, **kwargs), os.fspath(path))

    def image_index(self, image: Any) -> int:
        """Position of ``image``: a label of the ``image`` coordinate, else an integer position."""
        labels = list(self.ds["image"].values)
        if image in labels:
            return labels.index(image)
        if isinstance(image, (int, np.integer)) and -len(labels) <= int(image) < len(labels):
            return int(image) % len(labels)
        raise InputError(f"image {image!r} is neither a label ({', '.join(map(str, labels[:5]))}"
                       f"{' ...' if len(labels) > 5 else ''}) nor a position below {len(labels)}")

    def field(self, image: Any) -> KernelField | None:
        """The stored kernel-field model of one image (``None`` where none could be fitted)."""
        return self._field_at(self.image_index(image))

    def _field_at(self, i: int) -> KernelField | None:
        one = self.ds.isel(image=i)  # a lazy map reads this image's chunks only
        stored = {name: one[name].values for name in STORED}
        if int(stored["model_degree"]) < 0:  # no model: its tiles need not be read
            return None
        flags = np.asarray(one["quality_flag"].values).astype(np.int64)
        kernels = np.asarray(one["kernel"].values)
        return KernelField.from_arrays(stored, used=fl.modelled(kernels, flags) & (flags & fl.MODEL_OUTLIER == 0),
                                       rejected=(flags & fl.MODEL_OUTLIER) != 0, extent=self.extent)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(y_min, y_max, x_min, x_max)`` of the input images: ``[-0.5, n - 0.5]`` (:func:`map_extent`)."""
        return map_extent(self.ds)

    @property
    def directions(self) -> np.ndarray:
        """``(n_images,)`` int8: each image's direction, ``+1`` forward, ``-1`` reverse (:func:`image_directions`)."""
        return image_directions(self.ds)

    def direction(self, image: Any) -> int:
        """``image``'s direction: ``+1`` forward (its kernels blur the source: ``target = kernel * source +
        background``), ``-1`` reverse (they blur the target: ``source = kernel * target + background``), 0
        where the run has not reached it yet."""
        return int(self.directions[self.image_index(image)])

    def kernel_at(self, image: Any, y: Any, x: Any, *, outside: str = "raise") -> np.ndarray:
        """Model kernel(s) of ``image`` at input pixel position(s) ``(y, x)``: ``shape + (k, k)``.

        The kernel is in the image's direction (:meth:`direction`): for a forward image (``+1``) it
        blurs the source into the target (``target = kernel * source + background``); for a reverse
        image (``-1``, its target the sharper) it blurs the target into the source (``source = kernel *
        target + background``, its sum the flux ratio source/target).
        ``image`` is a label of the ``image`` coordinate, or else a position.
        Anywhere in the image (``-0.5 <= y <= ny - 0.5``, the same along x),
        beyond the outermost tile centres too; a position outside it raises an
        :class:`~pipeline.errors.OutsideImageError` (the model does not
        extrapolate), or with ``outside="nan"`` gets a NaN kernel and an
        :class:`~pipeline.errors.OutsideImageWarning`.
        """
        return self._kernel_at(self.image_index(image), y, x, outside=outside, stacklevel=2)

    def _kernel_at(self, i: int, y: Any, x: Any, *, outside: str = "raise", stacklevel: int = 2) -> np.ndarray:
        """``stacklevel``: where a warning points, counted from the caller of this method (2: its caller)."""
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        away = check_positions(y, x, self.extent, outside, stacklevel=stacklevel + 1)
        field = self._field_at(i)
        if field is None:
            k = self.ds.sizes["ky"]
            return np.full((*y.shape, k, k), np.nan)
        values = replace(field, extent=None).kernel_at(y, x)  # positions checked above
        values[away] = np.nan
        return values

    def model_kernels(self, direction: str | None = None) -> xr.DataArray:
        """The model's kernels at every tile centre, like ``kernel``, with each image's ``direction`` as a
        coordinate along ``image`` (``+1`` forward, ``-1`` reverse: a reverse image's kernels blur the
        target).  ``direction="forward"`` (or ``"reverse"``): only the images of that direction, an
        :class:`~pipeline.errors.InputError` where there are none."""
        directions = self.directions
        _check_option(direction)
        keep = np.arange(self.ds.sizes["image"])
        if direction is not None:
            keep = np.flatnonzero(directions == (FORWARD if direction == "forward" else REVERSE))
            if not keep.size:
                raise InputError(f"direction={direction!r}: no image of the kernel map is {direction} "
                                 f"({', '.join(sorted(set(direction_names(directions))))} only)")
        yy, xx = np.meshgrid(self.ds["y"].values, self.ds["x"].values, indexing="ij")
        values = np.stack([self._kernel_at(int(i), yy, xx) for i in keep])
        template = self.ds["kernel"].isel(image=keep)
        return xr.DataArray(values, coords=template.coords, dims=template.dims, name="model_kernel",
                            attrs={"long_name": "kernel of the smooth kernel-field model at the tile centre, in "
                                                "its image's direction"}).assign_coords(
            direction=("image", directions[keep], {"long_name": "1 forward: the kernel blurs the source; "
                                                                "-1 reverse: it blurs the target"}))

    def _shape_map(self, name: str, model: bool) -> xr.DataArray:
        if not model:
            return self.ds[name]
        kernels = self.model_kernels()
        flat = np.asarray(kernels.values).reshape(-1, *kernels.shape[-2:])
        moments = adaptive_moments(flat)
        values = np.asarray(getattr(moments, name)).reshape(kernels.shape[:-2])
        return xr.DataArray(values, coords=self.ds[name].coords, dims=self.ds[name].dims, name=f"model_{name}",
                            attrs={**self.ds[name].attrs, "source": "the smooth kernel-field model"})

    def fwhm_map(self, model: bool = False) -> xr.DataArray:
        """FWHM per tile (pixels): measured, or of the model's kernel with ``model=True``."""
        return self._shape_map("fwhm", model)

    def ellipticity_map(self, model: bool = False) -> xr.DataArray:
        """|e| per tile: measured, or of the model's kernel with ``model=True``."""
        return self._shape_map("ellipticity", model)


def decode_flags(flags: xr.DataArray) -> xr.Dataset:
    """One boolean variable per flag, read from the CF ``flag_masks`` / ``flag_meanings`` attributes alone."""
    masks = np.atleast_1d(flags.attrs["flag_masks"]).astype(np.int64)
    names = str(flags.attrs["flag_meanings"]).split()
    if len(masks) != len(names):
        raise InputError(f"{flags.name}: {len(masks)} flag_masks but {len(names)} flag_meanings")
    values = flags.astype(np.int64)
    return xr.Dataset({name: (values & int(mask)) != 0 for name, mask in zip(names, masks)})


@xr.register_dataset_accessor("kernelmap")
class KernelMapAccessor:
    """``ds.kernelmap``: the :class:`KernelMap` verbs on a kernel-map Dataset, with the same arguments."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    @property
    def map(self) -> KernelMap:
        return KernelMap(self._ds)

    def kernel_at(self, image: Any, y: Any, x: Any, *, outside: str = "raise") -> np.ndarray:
        """Model kernel(s) of ``image`` at input pixel position(s) ``(y, x)``: see :meth:`KernelMap.kernel_at`."""
        km = self.map
        return km._kernel_at(km.image_index(image), y, x, outside=outside, stacklevel=2)

    @property
    def directions(self) -> np.ndarray:
        """``(n_images,)``: each image's direction, see :attr:`KernelMap.directions`."""
        return self.map.directions

    def direction(self, image: Any) -> int:
        """``image``'s direction (``+1`` forward, ``-1`` reverse): see :meth:`KernelMap.direction`."""
        return self.map.direction(image)

    def model_kernels(self, direction: str | None = None) -> xr.DataArray:
        return self.map.model_kernels(direction)

    def fwhm_map(self, model: bool = False) -> xr.DataArray:
        return self.map.fwhm_map(model)

    def ellipticity_map(self, model: bool = False) -> xr.DataArray:
        return self.map.ellipticity_map(model)

    def flags(self) -> xr.Dataset:
        """``quality_flag`` decoded: one boolean map per flag."""
        return decode_flags(self._ds["quality_flag"])
