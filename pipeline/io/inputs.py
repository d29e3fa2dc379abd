"""The input stack: source, target and mask images read lazily from a Zarr store.

A store (Zarr format 2 or 3, a local path or any fsspec URL) holds a group
with ``source`` ``(image, y, x)`` or ``(y, x)`` (one reference shared by every
target image), ``target`` ``(image, y, x)`` and optionally ``mask`` like
``target`` or ``(y, x)``, nonzero marking bad pixels.  Array names are
configurable.  Dimension names come from Zarr 3 ``dimension_names`` or the
``_ARRAY_DIMENSIONS`` attribute that xarray writes in Zarr 2; arrays without
names are taken positionally.  An ``image`` coordinate array, when present,
labels the image axis.

Saturation levels (``input.saturation``), when given, make the source or
target pixels at or above them bad, widened by ``grow`` pixels
(:mod:`pipeline.core.saturation`): they are set to NaN in the copies the
reader returns.  A level is a number, a per-image coordinate of the store or
an attribute of the array; levels are resolved and checked when the store is
opened.

Per-pixel variances (``input.variance``) or weights, their inverses
(``input.weight``), are arrays of the same store shaped like the image they
describe; the reader returns them as float64 variances beside the pixels
(a weight of 0, NaN or inf as a NaN variance: a bad pixel of that image).
Their names, dtypes and shapes are checked when the store is opened; their
values (no negative ones) as each block is read.

The store is opened read-only and never written.  Everything is checked
before any block is read (the saturation check reads one chunk of a few
images), and the arrays come back as Dask arrays chunked like the store, so
later steps read whole stored chunks.
"""

from __future__ import annotations

import base64
import difflib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import zarr
import zarr.errors

from ..core.saturation import halo, mask_saturated
from ..errors import InputError

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "BlockPixels", "InputReader", "Inputs", "Saturation", "SaturationLevels", "StoredImages", "Variances",
    "open_inputs",
]

IMAGE_DIMS = ("image", "y", "x")
SPATIAL_DIMS = ("y", "x")
#: Attributes an xarray/CF writer uses to pack values or flag missing ones.
_CF_MISSING = ("_FillValue", "missing_value")
_CF_PACKING = ("scale_factor", "add_offset")
#: Images whose central chunk is read to check their saturation level against their median.
SATURATION_SAMPLE_IMAGES = 4


@dataclass(frozen=True, eq=False)
class Inputs:
    """Lazily read input images and what identifies them.

    Attributes
    ----------
    images
        Labels of the image axis: the ``image`` coordinate if the store has one,
        else ``arange(n_images)``.
    image_attrs
        Attributes of the image coordinate (empty without one).
    chunks
        Spatial ``(y, x)`` chunk shape of the stored target: the natural read unit.
    identity
        JSON-serialisable description of the store and of every array read.
    reader
        Reads one block's pixels of all three (and their variances, when
        given) directly from the store (what pipeline tasks use: no Dask
        graph between the store and a task).

    ``source``, ``target`` and ``mask`` are Dask arrays made on first use
    (saturated pixels NaN, as the reader returns them).
    """

    reader: InputReader
    images: np.ndarray
    image_attrs: dict[str, Any] = field(default_factory=dict)
    chunks: tuple[int, int] = (0, 0)
    identity: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def source(self) -> da.Array:
        """``(image, y, x)``, or ``(y, x)`` for one reference shared by every target."""
        return self.reader.to_dask("source")

    @cached_property
    def target(self) -> da.Array:
        """``(image, y, x)``."""
        return self.reader.to_dask("target")

    @cached_property
    def mask(self) -> da.Array | None:
        """``(image, y, x)`` or ``(y, x)``, nonzero = bad pixel; ``None`` without a mask."""
        return None if self.reader.mask is None else self.reader.mask.to_dask()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_images, ny, nx)`` of the target."""
        n, ny, nx = self.reader.target.shape
        return n, ny, nx

    @property
    def saturation(self) -> Saturation | None:
        """The saturation levels in use (``None`` without ``input.saturation``)."""
        return self.reader.saturation

    @property
    def variances(self) -> Variances | None:
        """The variance or weight arrays in use (``None`` without ``input.variance`` or ``input.weight``)."""
        return self.reader.variances

    @property
    def shared_source(self) -> bool:
        """True when one 2-D source is the reference of every target image."""
        return self.reader.source.ndim == 2

    def __repr__(self) -> str:
        n, ny, nx = self.shape
        src = "shared (y, x)" if self.shared_source else "(image, y, x)"
        stored_mask = self.reader.mask
        mask = "none" if stored_mask is None else ("(y, x)" if stored_mask.ndim == 2 else "(image, y, x)")
        labels = ", ".join(str(v) for v in self.images[:3]) + (", ..." if n > 3 else "")
        return (
            f"Inputs({self.identity.get('store')!r}, group={self.identity.get('group')!r}: "
            f"{n} images of {ny}x{nx} pixels [{labels}], source {src} {self.reader.source.dtype}, "
            f"target {self.reader.target.dtype}, mask {mask}, chunks {self.chunks[0]}x{self.chunks[1]}"
            + ("" if self.variances is None else f", {self.variances.describe()}") + ")"
        )


def open_inputs(
    path: str | os.PathLike[str],
    *,
    source: str = "source",
    target: str = "target",
    mask: str | None = None,
    group: str | None = None,
    storage_options: dict[str, Any] | None = None,
    min_size: int | None = None,
    saturation: Mapping[str, Any] | None = None,
    variance: Mapping[str, str | None] | None = None,
    weight: Mapping[str, str | None] | None = None,
) -> Inputs:
    """Open the input stack in a Zarr store, read-only and lazily.

    Parameters
    ----------
    path
        Local path or fsspec URL (``file://``, ``s3://``, ``memory://`` ...) of the store.
    source, target, mask
        Names of the arrays in the group; ``mask=None`` reads no mask.
    group
        Path of the group inside the store holding the arrays (default: the root).
    storage_options
        Options for the fsspec filesystem of a URL (credentials, endpoint ...).
    min_size
        Smallest allowed image side in pixels, e.g. the tile size.
    saturation
        ``{"source": level, "target": level, "grow": pixels}`` (each key
        optional, ``grow`` 1 by default): pixels at or above an image's level,
        widened by ``grow`` pixels, are read as NaN.  A level is a number (in
        the stored units after CF decoding), the name of a 1-D array along the
        image axis (one level per image; not for a shared 2-D source), the name
        of an attribute of the array (a number, or one per image), or ``None``.
    variance
        ``{"target": name, "source": name}`` (each optional): arrays of the
        group holding the per-pixel variances of the target ``(image, y, x)``
        and of the source (shaped like it: ``(image, y, x)``, or ``(y, x)``
        for a shared 2-D source).  Their chunks may differ from the images'.
    weight
        Like ``variance``, arrays of weights (inverse variances) instead; not
        with ``variance``.

    Returns
    -------
    Inputs
        The block reader, Dask arrays chunked like the store, the image labels and identity.

    Raises
    ------
    InputError
        The store, group or an array is missing, or the arrays do not fit
        together; a saturation level is missing, not one finite number per
        image, or at or below the median of an image (other units?); a
        variance or weight array is missing, not real numbers or not shaped
        like its image; both ``variance`` and ``weight`` are given.
    """
    where = os.fspath(path)
    if not isinstance(where, str):
        raise InputError(f"input.path must be a path or URL string, got {where!r}")
    is_url = "://" in where
    if not is_url:
        where = os.path.expanduser(where)
    if storage_options and not is_url:
        raise InputError(
            f"input.storage_options only apply to URLs, but {where!r} is a local path: "
            "drop them or give the store as a URL (e.g. file:///..., s3://...)"
        )
    store_id = where if is_url else os.path.abspath(where)
    grp = _open_group(where, group, storage_options if is_url else None)

    arrays: dict[str, tuple[str, zarr.Array]] = {}
    for key, name in (("source", source), ("target", target), ("mask", mask)):
        if name is not None:
            arrays[key] = (name, _get_array(grp, name, f"input.{key}", where, group))

    tgt_name, tgt_z = arrays["target"]
    src_name, src_z = arrays["source"]
    for key, (name, z) in arrays.items():
        _check_dtype(z, name, f"input.{key}", where, allow_bool=key == "mask")

    tgt_dims = _dimension_names(tgt_z)
    if tgt_z.ndim != 3:
        raise InputError(
            f"input.target: array '{tgt_name}' in {where} must be 3-D (image, y, x), got shape "
            f"{tgt_z.shape}; store a single image with a leading image axis of length 1"
        )
    if src_z.ndim not in (2, 3):
        raise InputError(
            f"input.source: array '{src_name}' in {where} must be 3-D (image, y, x) or 2-D (y, x) "
            f"for one reference shared by every target, got shape {src_z.shape}"
        )

    tgt = _stored(tgt_z, tgt_name, _axis_order(tgt_dims, IMAGE_DIMS))
    src = _stored(src_z, src_name, _axis_order(_dimension_names(src_z), IMAGE_DIMS[-src_z.ndim:]))
    n, ny, nx = (int(s) for s in tgt.shape)
    if n == 0:
        raise InputError(f"input.target: array '{tgt_name}' in {where} holds no images (shape {tgt_z.shape})")
    if src.ndim == 3 and src.shape[0] != n:
        raise InputError(
            f"input.source: '{src_name}' holds {src.shape[0]} images but target '{tgt_name}' holds {n} "
            f"in {where}: give one source per target image, or a 2-D (y, x) source shared by all"
        )
    if tuple(src.shape[-2:]) != (ny, nx):
        raise InputError(
            f"input.source: source '{src_name}' images are {src.shape[-2]}x{src.shape[-1]} pixels but "
            f"target '{tgt_name}' images are {ny}x{nx} in {where}: source and target must cover the "
            "same pixel grid; resample or crop them to match"
        )

    msk = None
    if "mask" in arrays:
        msk_name, msk_z = arrays["mask"]
        if msk_z.ndim not in (2, 3):
            raise InputError(
                f"input.mask: array '{msk_name}' in {where} must be (image, y, x) like the target or "
                f"(y, x) shared by every image, got shape {msk_z.shape}"
            )
        order = _axis_order(_dimension_names(msk_z), IMAGE_DIMS[-msk_z.ndim:])
        msk = _stored(msk_z, msk_name, order, decode=False)
        allowed = ((n, ny, nx), (ny, nx))
        dims_label = "(image, y, x)" if msk.ndim == 3 else "(y, x)"
        if tuple(msk.shape) not in allowed:
            raise InputError(
                f"input.mask: mask '{msk_name}' has shape {tuple(msk.shape)} as {dims_label} but must be "
                f"{allowed[0]} like target '{tgt_name}' or {allowed[1]} shared by every image, in {where}"
            )

    if min(ny, nx) == 0:
        raise InputError(f"input.target: images in {where} are {ny}x{nx} pixels: there is nothing to process")
    if min_size is not None and min(ny, nx) < min_size:
        raise InputError(
            f"images are {ny}x{nx} pixels, smaller than one tile ({min_size}): use a smaller tiles.size"
        )

    kind, noise_spec = _noise_spec(variance, weight)
    noise_names = [name for name in noise_spec.values() if name is not None]
    image_name = _image_dim_name(tgt_dims, IMAGE_DIMS)
    images, image_attrs, image_source = _image_labels(
        grp, image_name, n, where, exclude={name for name, _ in arrays.values()} | set(noise_names)
    )
    noise = None
    if kind is not None:
        labels = () if image_source is None else tuple(str(v) for v in images)
        noise = _variances(kind, noise_spec, grp, {"source": src, "target": tgt}, arrays, where, group, labels)

    read_chunks = _read_chunks(tgt_z)
    order = _axis_order(tgt_dims, IMAGE_DIMS)
    chunks = (int(read_chunks[order[1]]), int(read_chunks[order[2]]))

    sat = None
    if saturation is not None:
        stored = {"source": src, "target": tgt}
        sat = _saturation(saturation, grp, stored, where, images, image_name,
                          exclude={name for name, _ in arrays.values()} | set(noise_names) | {image_name})

    identity: dict[str, Any] = {
        "store": store_id,
        "group": group or "",
        "image_coordinate": image_source,
        "arrays": {key: _describe(name, z, decoded=key != "mask") for key, (name, z) in arrays.items()},
    }
    if sat is not None:
        identity["saturation"] = sat.identity()
    if noise is not None:
        identity["variance"] = noise.identity()
    json.dumps(identity)  # fails here, not in a later writer, if something is not serialisable
    return Inputs(
        reader=InputReader(src, tgt, msk, sat, noise),
        images=images,
        image_attrs=image_attrs,
        chunks=chunks,
        identity=identity,
    )


# --------------------------------------------------------------------------- store


def _open_group(where: str, group: str | None, storage_options: dict[str, Any] | None) -> zarr.Group:
    """The group at ``group`` in the store at ``where``, opened read-only."""
    kwargs: dict[str, Any] = {"mode": "r"}
    if storage_options:
        kwargs["storage_options"] = dict(storage_options)
    try:
        root = zarr.open_group(where, **kwargs)
    except ImportError as exc:
        raise InputError(f"input.path: cannot read {where}: {exc}") from exc
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, zarr.errors.ContainsArrayError) as exc:
        if _is_array(where, kwargs):
            raise InputError(
                f"input.path: {where} is a single Zarr array, not a group: point input.path at the "
                "store holding the source and target arrays"
            ) from exc
        raise InputError(
            f"input.path: no Zarr store at {where}: check the path or URL "
            "(a store is a directory with zarr.json or .zgroup at its top)"
        ) from exc
    except ValueError as exc:  # e.g. an unknown URL protocol
        raise InputError(f"input.path: cannot open {where}: {exc}") from exc
    if not group:
        return root
    try:
        node = root[group]
    except KeyError:
        node = None
    if not isinstance(node, zarr.Group):
        what = "an array, not a group" if isinstance(node, zarr.Array) else "missing"
        raise InputError(
            f"input.group: group '{group}' in {where} is {what}; groups there: "
            f"{_listing(sorted(root.group_keys()))}"
        )
    return node


def _is_array(where: str, kwargs: dict[str, Any]) -> bool:
    """True when ``where`` holds a single array rather than a group."""
    try:
        zarr.open_array(where, **kwargs)
    except Exception:  # anything that is not an array
        return False
    return True


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "(none)"


def _get_array(grp: zarr.Group, name: str, key: str, where: str, group: str | None, *,
               suggest: bool = False) -> zarr.Array:
    """Array ``name`` of the group, or an error listing what is there (and, with ``suggest``, close names)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{key}: array names must be non-empty strings, got {name!r}")
    node = _lookup(grp, name)
    if node is None and grp.metadata.consolidated_metadata is not None:
        # consolidated metadata can be stale: look at the store itself
        fresh = zarr.open_group(grp.store_path, mode="r", use_consolidated=False)
        node, grp = _lookup(fresh, name), fresh
    place = f"{where} (group '{group}')" if group else where
    if isinstance(node, zarr.Group):
        raise InputError(f"{key}: '{name}' in {place} is a group, not an array: set {key} to an array in it")
    if node is None:
        subgroups = sorted(grp.group_keys())
        hint = f"; groups there: {_listing(subgroups)} (set input.group to read one)" if subgroups else ""
        names = sorted(grp.array_keys())
        close = _close_names(name, names) if suggest else []
        if close:
            hint += f"; did you mean {' or '.join(map(repr, close))}? Set {key} to an array there"
        raise InputError(f"{key}: no array '{name}' in {place}; arrays there: {_listing(names)}{hint}")
    return node


def _lookup(grp: zarr.Group, name: str) -> zarr.Array | zarr.Group | None:
    try:
        return grp[name]
    except KeyError:
        return None


# --------------------------------------------------------------------------- arrays


def _check_dtype(z: zarr.Array, name: str, key: str, where: str, *, allow_bool: bool) -> None:
    """Raise unless ``z`` holds real numbers (or booleans, for a mask)."""
    kinds = "iuf" + ("b" if allow_bool else "")
    dtype = z.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in kinds and dtype.fields is None:
        return
    what = "a mask of numbers or booleans" if allow_bool else "real numbers (integers or floats)"
    fix = {
        "c": "store abs() or the real part",
        "b": "store it as the mask array, or as 0/1 integers",
    }.get(getattr(dtype, "kind", ""), "convert it to a numeric dtype")
    raise InputError(f"{key}: array '{name}' in {where} must hold {what}, got dtype {dtype}; {fix}")


def _dimension_names(z: zarr.Array) -> tuple[str | None, ...] | None:
    """Dimension names stored with ``z``: Zarr 3 metadata or xarray's Zarr 2 attribute."""
    names = getattr(z.metadata, "dimension_names", None)
    if names is None:
        names = z.attrs.get("_ARRAY_DIMENSIONS")
    if not isinstance(names, (list, tuple)) or len(names) != z.ndim:
        return None
    return tuple(n if isinstance(n, str) else None for n in names)


def _axis_order(names: tuple[str | None, ...] | None, expected: tuple[str, ...]) -> tuple[int, ...]:
    """Stored axis for each expected dimension.

    Known names (``image``, ``y``, ``x``) locate their axis; the remaining
    axes fill the remaining dimensions in stored order.  Without names, or
    with a name given twice, the order is positional.
    """
    ndim = len(expected)
    if names is None or len(names) != ndim:
        return tuple(range(ndim))
    known = [n for n in names if n in expected]
    if len(set(known)) != len(known):
        return tuple(range(ndim))
    order: list[int | None] = [names.index(d) if d in names else None for d in expected]
    rest = iter(i for i in range(ndim) if i not in order)
    return tuple(i if i is not None else next(rest) for i in order)


def _image_dim_name(names: tuple[str | None, ...] | None, expected: tuple[str, ...]) -> str:
    """Name of the stored image dimension (``image`` when unnamed)."""
    if names is None:
        return "image"
    return names[_axis_order(names, expected)[0]] or "image"


def _read_chunks(z: zarr.Array) -> tuple[int, ...]:
    """Shape of one stored read unit: the shard when sharded, else the chunk."""
    shards = getattr(z, "shards", None)
    return tuple(int(c) for c in (shards or z.chunks))


@dataclass(frozen=True)
class CFDecoding:
    """xarray's CF decoding of one stored array: missing values to NaN, then unpacking."""

    missing: tuple[float, ...] = ()
    scale_factor: float | None = None
    add_offset: float | None = None
    dtype: str = "float64"

    def __call__(self, values: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        out = values.astype(dtype)
        if self.scale_factor is not None:
            out *= dtype.type(self.scale_factor)
        if self.add_offset is not None:
            out += dtype.type(self.add_offset)
        if self.missing:
            out[np.isin(values, self.missing)] = np.nan
        return out


@dataclass(frozen=True)
class StoredImages:
    """One stored input array, read region by region as ``(image, y, x)`` or ``(y, x)``.

    ``order`` gives the stored axis of each of those dimensions; values come
    back in native byte order and CF-decoded when ``decoding`` is set.
    Picklable: a task on another process reads its own pixels with it.
    """

    array: zarr.Array
    name: str
    order: tuple[int, ...]
    decoding: CFDecoding | None = None

    @property
    def ndim(self) -> int:
        return len(self.order)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(self.array.shape[axis]) for axis in self.order)

    @property
    def dtype(self) -> np.dtype:
        if self.decoding is not None:
            return np.dtype(self.decoding.dtype)
        return self.array.dtype.newbyteorder("=")

    def decode(self, values: np.ndarray) -> np.ndarray:
        """Stored values (in stored axis order) to what the pipeline reads."""
        if self.decoding is not None:
            return self.decoding(values)
        return values.astype(self.dtype, copy=False)

    def read(self, image: int | None, ys: slice, xs: slice) -> np.ndarray:
        """Pixels ``[ys, xs]`` of ``image`` (``None`` for a 2-D array), shape ``(ny, nx)``."""
        wanted = (ys, xs) if self.ndim == 2 else (slice(image, image + 1), ys, xs)
        selection: list[slice] = [slice(None)] * self.ndim
        for dim, axis in enumerate(self.order):
            selection[axis] = wanted[dim]
        values = np.transpose(self.decode(self.array[tuple(selection)]), self.order)
        return values if self.ndim == 2 else values[0]

    def to_dask(self) -> da.Array:
        """The whole array as Dask, chunked like the store (its read unit)."""
        import dask.array as da
        from dask.base import tokenize

        z, name = self.array, self.name
        chunks = _read_chunks(z)
        token = tokenize(str(z.store_path), z.metadata.to_dict(), chunks)
        arr = da.from_array(
            z, chunks=chunks, name=f"zarr-{name}-{token}", meta=np.empty((0,) * z.ndim, dtype=z.dtype),
            lock=False, asarray=True,
        )
        if self.decoding is not None or not z.dtype.isnative:
            arr = arr.map_blocks(self.decode, dtype=self.dtype, name=f"decode-{name}-{token}")
        if self.order != tuple(range(z.ndim)):
            arr = arr.transpose(self.order)
        return arr


class BlockPixels(NamedTuple):
    """What :meth:`InputReader.read` returns for one region of one image."""

    source: np.ndarray  #: ``(ny, nx)``: the image's source, or the shared 2-D one
    target: np.ndarray  #: ``(ny, nx)``
    mask: np.ndarray | None  #: ``(ny, nx)`` nonzero = bad; ``None`` without a mask
    variance: np.ndarray | None = None  #: ``(ny, nx)`` float64 variances of the target (NaN: bad); or ``None``
    source_variance: np.ndarray | None = None  #: of the source; ``None`` when not given


@dataclass(frozen=True)
class InputReader:
    """Reads the source, target and mask pixels of one block; travels to worker processes.

    With ``saturation``, the source and target pixels at or above their
    image's level, widened by ``saturation.grow`` pixels, come back as NaN
    (in a float copy; the store is never written).  The widening reads
    ``grow`` pixels around the region, so a pixel's value does not depend on
    the region it is read in.  With ``variances``, the per-pixel variances
    of the target and the source come back too.
    """

    source: StoredImages
    target: StoredImages
    mask: StoredImages | None = None
    saturation: Saturation | None = None
    variances: Variances | None = None

    def read(self, image: int, ys: slice, xs: slice) -> BlockPixels:
        """Pixels ``[ys, xs]`` of ``image``: source, target, mask and the variances (``None`` when not given).

        Raises
        ------
        InputError
            A variance or weight array has negative values in the region.
        """
        def one(arr: StoredImages, levels: SaturationLevels | None = None) -> np.ndarray:
            index = None if arr.ndim == 2 else image
            if levels is None:
                return arr.read(index, ys, xs)
            return _read_saturated(arr, index, ys, xs, levels.level(index), self.saturation.grow)

        sat, noise = self.saturation, self.variances
        return BlockPixels(
            one(self.source, sat and sat.source), one(self.target, sat and sat.target),
            None if self.mask is None else one(self.mask),
            None if noise is None else noise.read("target", image, ys, xs),
            None if noise is None else noise.read("source", image, ys, xs),
        )

    def to_dask(self, role: str) -> da.Array:
        """The whole ``source`` or ``target`` as Dask, chunked like the store, saturated pixels NaN."""
        arr: StoredImages = getattr(self, role)
        levels = None if self.saturation is None else getattr(self.saturation, role)
        lazy = arr.to_dask()
        if levels is None:
            return lazy
        grow = self.saturation.grow
        dtype = mask_dtype(arr.dtype)

        def mask_block(values: np.ndarray, block_info: dict | None = None) -> np.ndarray:
            if values.ndim == 2:
                return mask_saturated(values, levels.level(None), grow)
            start, stop = block_info[0]["array-location"][0]
            return mask_saturated(values, levels.levels[start:stop], grow)

        depth = {axis: (grow if axis >= lazy.ndim - 2 else 0) for axis in range(lazy.ndim)}
        return lazy.map_overlap(mask_block, depth=depth, boundary="none", dtype=dtype,
                                meta=np.empty((0,) * lazy.ndim, dtype=dtype))


def mask_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of values with saturated pixels as NaN: floats keep theirs, others become float64."""
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def _read_saturated(arr: StoredImages, image: int | None, ys: slice, xs: slice, level: float,
                    grow: int) -> np.ndarray:
    """Pixels ``[ys, xs]`` with the saturated ones NaN, read with a halo of ``grow`` pixels."""
    ny, nx = arr.shape[-2:]
    y0, y1, _ = ys.indices(ny)
    x0, x1, _ = xs.indices(nx)
    read_y, keep_y = halo(y0, max(y0, y1), grow, ny)
    read_x, keep_x = halo(x0, max(x0, x1), grow, nx)
    values = arr.read(image, read_y, read_x)
    return mask_saturated(values, level, grow)[keep_y, keep_x]


def _stored(z: zarr.Array, name: str, order: tuple[int, ...], *, decode: bool = True) -> StoredImages:
    return StoredImages(z, name, order, _cf_decoding(z) if decode else None)


def _missing_values(z: zarr.Array) -> list[float]:
    """Values that mark missing pixels under xarray's CF encoding of ``z``."""
    attrs = z.attrs
    values: list[Any] = []
    for key in _CF_MISSING:
        if key in attrs:
            value = attrs[key]
            if isinstance(value, str) and z.dtype.kind == "f":  # xarray's Zarr 3 float encoding
                try:
                    value = struct.unpack("<d", base64.standard_b64decode(value))[0]
                except (ValueError, struct.error):
                    continue
            values.extend(np.atleast_1d(value).tolist())
    if z.metadata.zarr_format == 2 and "_ARRAY_DIMENSIONS" in attrs and z.fill_value is not None:
        values.append(z.fill_value)  # xarray writes _FillValue as the Zarr 2 fill_value
    out: list[float] = []
    for v in values:
        if isinstance(v, (bool, int, float, np.number)) and not np.isnan(v) and v not in out:
            out.append(v)
    return out


def _cf_decoding(z: zarr.Array) -> CFDecoding | None:
    """The CF decoding xarray would apply to ``z``; ``None`` when there is none."""
    attrs = z.attrs
    missing = _missing_values(z)
    packed = [k for k in _CF_PACKING if k in attrs]
    if not missing and not packed:
        return None
    kind, size = z.dtype.kind, z.dtype.itemsize
    if kind == "f" and not packed:
        out_dtype = z.dtype.newbyteorder("=")
    elif (kind == "f" and size <= 4) or (kind in "iu" and size <= 2):
        out_dtype = np.dtype("float32")
    else:
        out_dtype = np.dtype("float64")
    return CFDecoding(
        missing=tuple(float(v) for v in missing),
        scale_factor=float(attrs["scale_factor"]) if "scale_factor" in attrs else None,
        add_offset=float(attrs["add_offset"]) if "add_offset" in attrs else None,
        dtype=out_dtype.str,
    )


def _describe(name: str, z: zarr.Array, *, decoded: bool) -> dict[str, Any]:
    """JSON-serialisable identity of one stored array (and the CF decoding applied to it)."""
    names = _dimension_names(z)
    desc: dict[str, Any] = {
        "name": name,
        "shape": [int(s) for s in z.shape],
        "dtype": str(z.dtype),
        "chunks": [int(c) for c in z.chunks],
        "zarr_format": int(z.metadata.zarr_format),
        "dimension_names": None if names is None else list(names),
    }
    shards = getattr(z, "shards", None)
    if shards:
        desc["shards"] = [int(s) for s in shards]
    if decoded:
        packing = {k: float(z.attrs[k]) for k in _CF_PACKING if k in z.attrs}
        missing = _missing_values(z)
        if packing:
            desc["packing"] = packing
        if missing:
            desc["missing_values"] = [v.item() if isinstance(v, np.generic) else v for v in missing]
    return desc


# --------------------------------------------------------------------------- image labels


def _image_labels(
    grp: zarr.Group, name: str, n: int, where: str, *, exclude: set[str]
) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """Labels of the image axis, their attributes and the array they came from."""
    node = None if name in exclude else _lookup(grp, name)
    if not isinstance(node, zarr.Array):
        return np.arange(n), {}, None
    if node.ndim != 1 or node.shape[0] != n:
        raise InputError(
            f"input: the image coordinate '{name}' in {where} has shape {node.shape} but the target "
            f"holds {n} images: it must be 1-D with one label per image; fix or remove it"
        )
    raw = np.asarray(node[...])
    attrs = {k: _plain(v) for k, v in node.attrs.items() if k != "_ARRAY_DIMENSIONS"}
    labels, attrs = _decode_labels(raw, attrs, name, where)
    return labels, attrs, name


def _plain(value: Any) -> Any:
    """Attribute values as plain Python objects."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _decode_labels(
    raw: np.ndarray, attrs: dict[str, Any], name: str, where: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Image labels as a NumPy array of str, numbers or datetimes."""
    kind = raw.dtype.kind
    if kind == "S" or (kind == "O" and any(isinstance(v, bytes) for v in raw)):
        encoding = attrs.pop("_Encoding", "utf-8")
        return np.array([_text(v, encoding) for v in raw], dtype=str), attrs
    if kind in "UOT":  # fixed-length, object or variable-length (StringDType) strings
        return np.array([str(v) for v in raw], dtype=str), attrs
    if kind in "iuf" and " since " in str(attrs.get("units", "")):
        return _decode_times(raw, attrs, name, where)
    if kind in "iufbMm":
        return raw.astype(raw.dtype.newbyteorder("=")), attrs
    raise InputError(
        f"input: the image coordinate '{name}' in {where} has dtype {raw.dtype}; "
        "labels must be strings, numbers or datetimes"
    )


def _text(value: Any, encoding: str) -> str:
    return value.decode(encoding) if isinstance(value, bytes) else str(value)


def _decode_times(
    raw: np.ndarray, attrs: dict[str, Any], name: str, where: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """CF-encoded times (``units: "days since ..."``) as datetime64 labels."""
    import xarray as xr

    var = xr.Variable(("image",), raw, attrs)
    ds = xr.Dataset(coords={"image": var})
    try:
        decoded = xr.decode_cf(ds, mask_and_scale=False, decode_times=True, decode_timedelta=False)
        values = np.asarray(decoded["image"].values)
    except (ValueError, TypeError, OverflowError, ImportError):
        return raw, attrs  # undecodable: keep the numbers and the units that explain them
    if values.dtype.kind != "M":
        return raw, attrs
    return values, {k: v for k, v in attrs.items() if k not in ("units", "calendar")}


# --------------------------------------------------------------------------- saturation levels


@dataclass(frozen=True, eq=False)
class SaturationLevels:
    """The upper valid levels of one input array, resolved from ``input.saturation``.

    Attributes
    ----------
    levels
        ``(n_images,)`` float64 for an ``(image, y, x)`` array, a 0-d array for a shared 2-D source.
    origin
        Where the levels came from, for people: ``"60000"``, ``"coordinate 'SATURATE'"``, ...
    setting
        The value of ``input.saturation.<role>`` (a number or a name).
    medians
        ``(image index or None, median)`` of the images sampled to check the levels.
    """

    levels: np.ndarray
    origin: str
    setting: float | str
    medians: tuple[tuple[int | None, float], ...] = ()

    def level(self, image: int | None) -> float:
        """The level of ``image`` (``None`` for a shared 2-D source)."""
        return float(self.levels if image is None or self.levels.ndim == 0 else self.levels[image])

    def describe(self) -> str:
        """``coordinate 'SATURATE' (58000 to 61000 over 3 images; sampled medians 96 to 130)``."""
        lo, hi = float(np.min(self.levels)), float(np.max(self.levels))
        text = self.origin
        if not isinstance(self.setting, float):
            text += f" = {lo:g}" if lo == hi else f" ({lo:g} to {hi:g} over {self.levels.size} images)"
        meds = [m for _, m in self.medians if math.isfinite(m)]
        if meds:
            low, high = min(meds), max(meds)
            what = f"median {low:.4g}" if len(meds) == 1 else f"medians {low:.4g} to {high:.4g}"
            text += f"; sampled {what}"
        return text

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable: the setting and the levels (one number when all are equal)."""
        flat = self.levels.ravel()
        same = bool(flat.size) and bool(np.all(flat == flat[0]))
        levels: Any = float(flat[0]) if same else [float(v) for v in flat]
        return {"setting": self.setting, "levels": levels}


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


def _saturation(spec: Mapping[str, Any], grp: zarr.Group, stored: dict[str, StoredImages], where: str,
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
        levels = _resolve_levels(setting, role, grp, stored[role], where, len(images), image_name,
                                 exclude)
        resolved[role] = _checked_levels(levels, role, stored[role], images)
    return Saturation(resolved["source"], resolved["target"], int(grow))


def _resolve_levels(setting: Any, role: str, grp: zarr.Group, arr: StoredImages, where: str, n: int,
                    image_name: str, exclude: set[str]) -> SaturationLevels:
    """The levels ``input.saturation.<role>`` names, one per image of ``arr`` (one for a 2-D source)."""
    key = f"input.saturation.{role}"
    shape = () if arr.ndim == 2 else (n,)
    if isinstance(setting, (int, float, np.number)) and not isinstance(setting, (bool, np.bool_)):
        if not math.isfinite(setting):
            raise InputError(f"{key}: {setting!r} is not a finite number: give the level, or none")
        return SaturationLevels(np.full(shape, float(setting)), f"{float(setting):g}", float(setting))
    if not isinstance(setting, str) or not setting:
        raise InputError(f"{key}: {setting!r} is not a number or the name of a coordinate or attribute")
    name = setting
    node = None if name in exclude else _lookup(grp, name)
    attrs = arr.array.attrs
    # a coordinate (one level per image) before an attribute, except for a shared source (one level)
    if name in attrs and (arr.ndim == 2 or not isinstance(node, zarr.Array)):
        return _attribute_levels(attrs[name], key, name, arr, n)
    if isinstance(node, zarr.Array):
        return _coordinate_levels(node, name, key, role, arr, where, n, image_name)
    coords = [c for c in sorted(grp.array_keys()) if c not in exclude and _along_images(grp[c], n)]
    attr_names = sorted(k for k in attrs if not k.startswith("_"))
    listed = ", ".join(attr_names[:20]) + (f" and {len(attr_names) - 20} more" if len(attr_names) > 20 else "")
    close = _close_names(name, (coords if arr.ndim == 3 else []) + attr_names)
    what = f"'{name}' in {where} is a group, not a coordinate" if isinstance(node, zarr.Group) else \
        f"no coordinate '{name}' along the images in {where}"
    available = f"attributes of '{arr.name}': {listed or '(none)'}"
    if arr.ndim == 3:
        available = f"coordinates along '{image_name}' there: {_listing(coords)}; {available}"
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
    raise InputError(f"{key}: {what}, and no attribute '{name}' of array '{arr.name}'; {available}{hint} "
                     "Give one of those, or the level as a number")


def _along_images(node: zarr.Array | zarr.Group, n: int) -> bool:
    return isinstance(node, zarr.Array) and node.ndim == 1 and node.shape[0] == n


def _close_names(name: str, names: list[str]) -> list[str]:
    """Names like ``name``, ignoring case first."""
    by_lower = {c.lower(): c for c in names}
    if name.lower() in by_lower:
        return [by_lower[name.lower()]]
    return [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.6)]


def _coordinate_levels(node: zarr.Array, name: str, key: str, role: str, arr: StoredImages, where: str,
                       n: int, image_name: str) -> SaturationLevels:
    """One level per image from the 1-D array ``name`` of the store, along the image axis."""
    if arr.ndim == 2:
        raise InputError(
            f"{key}: '{name}' is an array of the input store (a level per image), but {role} "
            f"'{arr.name}' is one 2-D reference shared by every target image, so it has one level: give a "
            f"number, or the name of an attribute of array '{arr.name}'")
    dims = _dimension_names(node)
    if node.ndim != 1 or node.shape[0] != n:
        raise InputError(
            f"{key}: coordinate '{name}' in {where} has shape {tuple(node.shape)} but must be 1-D along "
            f"'{image_name}' with one level per image ({n}); fix it, or give the level as a number")
    if dims is not None and dims[0] is not None and dims[0] != image_name:
        raise InputError(
            f"{key}: coordinate '{name}' in {where} lies along '{dims[0]}', not along the image axis "
            f"'{image_name}': give a coordinate with one level per image, or the level as a number")
    if not (isinstance(node.dtype, np.dtype) and node.dtype.kind in "iuf"):
        raise InputError(
            f"{key}: coordinate '{name}' in {where} holds {node.dtype} values, not numbers: the levels must "
            "be numbers in the units of the stored pixels")
    raw = np.asarray(node[...])
    decoding = _cf_decoding(node)
    values = (decoding(raw) if decoding is not None else raw).astype(np.float64)
    return SaturationLevels(values, f"coordinate '{name}'", name)


def _attribute_levels(value: Any, key: str, name: str, arr: StoredImages, n: int) -> SaturationLevels:
    """The level(s) in attribute ``name`` of the array: one number, or one per image."""
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
            f"{key}: {where} is {shown}, not a number{per_image}: fix the attribute, or give the level "
            "as a number")
    return SaturationLevels(levels, where, name)


def _checked_levels(levels: SaturationLevels, role: str, arr: StoredImages,
                    images: np.ndarray) -> SaturationLevels:
    """``levels`` after checking they are finite and above the median of a few images (their medians kept)."""
    key = f"input.saturation.{role}"
    values = levels.levels
    bad = np.flatnonzero(~np.isfinite(values.ravel()))
    if bad.size:
        which = ", ".join(repr(str(images[i])) for i in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise InputError(
            f"{key}: {levels.origin} is not a finite number for {bad.size} image(s) ({which}): every image "
            "needs a finite level; fix those values, or give the level as a number")
    medians = []
    origin = "" if isinstance(levels.setting, float) else f" ({levels.origin})"
    for image in _sample_images(values):
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
    return replace(levels, medians=tuple(medians))


def _sample_images(levels: np.ndarray) -> list[int | None]:
    """Images checked against their median: evenly spaced ones and the one with the lowest level."""
    if levels.ndim == 0:
        return [None]
    n = levels.size
    picks = {int(i) for i in np.linspace(0, n - 1, min(n, SATURATION_SAMPLE_IMAGES)).round()}
    picks.add(int(np.argmin(levels)))
    return sorted(picks)


def _central_median(arr: StoredImages, image: int | None) -> tuple[float, tuple[str, str]]:
    """NaN-ignoring median of the stored read unit at the centre of ``image``, and where it lies."""
    chunks = _read_chunks(arr.array)
    ny, nx = arr.shape[-2:]
    cy, cx = (int(chunks[arr.order[-2]]), int(chunks[arr.order[-1]]))
    y0, x0 = (ny // 2) // cy * cy, (nx // 2) // cx * cx
    ys, xs = slice(y0, min(y0 + cy, ny)), slice(x0, min(x0 + cx, nx))
    values = arr.read(image, ys, xs)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    median = float(np.median(finite)) if finite.size else math.nan
    return median, (f"{ys.start}:{ys.stop}", f"{xs.start}:{xs.stop}")


# --------------------------------------------------------------------------- variances and weights


@dataclass(frozen=True, eq=False)
class Variances:
    """The arrays of per-pixel variances (or weights, their inverses) of the target and the source.

    Attributes
    ----------
    kind
        ``"variance"`` or ``"weight"`` (``variance = 1 / weight``; a weight of
        0, NaN or inf is a bad pixel, a NaN variance).
    target, source
        The stored arrays, shaped like the image they describe (``None``: not given).
    where
        The store, for messages.
    labels
        The image labels of the store's image coordinate, for messages (empty without one).
    """

    kind: str
    target: StoredImages | None
    source: StoredImages | None
    where: str = ""
    labels: tuple[str, ...] = ()

    def read(self, role: str, image: int, ys: slice, xs: slice) -> np.ndarray | None:
        """Float64 variances ``[ys, xs]`` of ``image``'s ``role`` image (``None`` when not given).

        Raises
        ------
        InputError
            Naming the array, the image and the region, where a value is negative.
        """
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
        """``weights: target 'target_wht' float32 (image, y, x), source none``."""
        parts = []
        for role in ("target", "source"):
            arr: StoredImages | None = getattr(self, role)
            dims = "" if arr is None else ("(y, x)" if arr.ndim == 2 else "(image, y, x)")
            parts.append(f"{role} none" if arr is None else f"{role} '{arr.name}' {arr.dtype} {dims}")
        return f"{self.kind}s: " + ", ".join(parts)

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable: the kind and each stored array's description."""
        return {"kind": self.kind,
                **{role: None if arr is None else _describe(arr.name, arr.array, decoded=True)
                   for role, arr in (("target", self.target), ("source", self.source))}}


def _noise_spec(variance: Mapping[str, Any] | None,
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


def _variances(kind: str, spec: dict[str, str | None], grp: zarr.Group, images_by_role: dict[str, StoredImages],
               arrays: dict[str, tuple[str, zarr.Array]], where: str, group: str | None,
               labels: tuple[str, ...]) -> Variances:
    """Open and check the variance or weight arrays ``spec`` names (names, dtypes, shapes)."""
    used = {name: role for role, (name, _) in arrays.items()}
    values = "variances" if kind == "variance" else "weights"
    stored: dict[str, StoredImages | None] = {}
    for role in ("target", "source"):
        name = spec.get(role)
        if name is None:
            stored[role] = None
            continue
        key = f"input.{kind}.{role}"
        if name in used:
            raise InputError(f"{key}: '{name}' is the {used[name]} array itself: give the array holding the "
                             f"{role}'s {values}")
        z = _get_array(grp, name, key, where, group, suggest=True)
        _check_dtype(z, name, key, where, allow_bool=False)
        image = images_by_role[role]
        stored[role] = _shaped_like(z, name, key, image, role, values, where)
    return Variances(kind, stored["target"], stored["source"], where, labels)


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
    arr = _stored(z, name, _axis_order(_dimension_names(z), IMAGE_DIMS[-z.ndim:]))
    if arr.shape != image.shape:
        raise InputError(
            f"{key}: array '{name}' in {where} has shape {arr.shape} as {dims} but {role} '{image.name}' has "
            f"{image.shape}: the {values} must cover every pixel of the {role} (the same images and pixel "
            "grid; the chunks may differ); resample or crop them to match")
    return arr
