"""The input stack: source, target and mask images read lazily from a Zarr store.

A store (Zarr format 2 or 3, a local path or any fsspec URL) holds a group
with ``source`` ``(image, y, x)`` or ``(y, x)`` (one reference shared by every
target image), ``target`` ``(image, y, x)`` and optionally ``mask`` like
``target`` or ``(y, x)``, nonzero marking bad pixels.  Array names are
configurable.  Dimension names come from Zarr 3 ``dimension_names`` or the
``_ARRAY_DIMENSIONS`` attribute that xarray writes in Zarr 2; arrays without
names are taken positionally.  An ``image`` coordinate array, when present,
labels the image axis.

The store is opened read-only and never written.  Everything is checked
before any pixel is read, and the arrays come back as Dask arrays chunked like
the store, so later steps read whole stored chunks.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.errors

from ..errors import InputError

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["InputReader", "Inputs", "StoredImages", "open_inputs"]

IMAGE_DIMS = ("image", "y", "x")
SPATIAL_DIMS = ("y", "x")
#: Attributes an xarray/CF writer uses to pack values or flag missing ones.
_CF_MISSING = ("_FillValue", "missing_value")
_CF_PACKING = ("scale_factor", "add_offset")


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
        Reads one block's pixels of all three directly from the store (what
        pipeline tasks use: no Dask graph between the store and a task).

    ``source``, ``target`` and ``mask`` are Dask arrays made on first use.
    """

    reader: InputReader
    images: np.ndarray
    image_attrs: dict[str, Any] = field(default_factory=dict)
    chunks: tuple[int, int] = (0, 0)
    identity: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def source(self) -> da.Array:
        """``(image, y, x)``, or ``(y, x)`` for one reference shared by every target."""
        return self.reader.source.to_dask()

    @cached_property
    def target(self) -> da.Array:
        """``(image, y, x)``."""
        return self.reader.target.to_dask()

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
            f"target {self.reader.target.dtype}, mask {mask}, chunks {self.chunks[0]}x{self.chunks[1]})"
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

    Returns
    -------
    Inputs
        The block reader, Dask arrays chunked like the store, the image labels and identity.

    Raises
    ------
    InputError
        The store, group or an array is missing, or the arrays do not fit together.
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

    image_name = _image_dim_name(tgt_dims, IMAGE_DIMS)
    images, image_attrs, image_source = _image_labels(
        grp, image_name, n, where, exclude={name for name, _ in arrays.values()}
    )

    read_chunks = _read_chunks(tgt_z)
    order = _axis_order(tgt_dims, IMAGE_DIMS)
    chunks = (int(read_chunks[order[1]]), int(read_chunks[order[2]]))

    identity: dict[str, Any] = {
        "store": store_id,
        "group": group or "",
        "image_coordinate": image_source,
        "arrays": {key: _describe(name, z, decoded=key != "mask") for key, (name, z) in arrays.items()},
    }
    json.dumps(identity)  # fails here, not in a later writer, if something is not serialisable
    return Inputs(
        reader=InputReader(src, tgt, msk),
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


def _get_array(grp: zarr.Group, name: str, key: str, where: str, group: str | None) -> zarr.Array:
    """Array ``name`` of the group, or an error listing what is there."""
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
        raise InputError(
            f"{key}: no array '{name}' in {place}; arrays there: {_listing(sorted(grp.array_keys()))}{hint}"
        )
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


@dataclass(frozen=True)
class InputReader:
    """Reads the source, target and mask pixels of one block; travels to worker processes."""

    source: StoredImages
    target: StoredImages
    mask: StoredImages | None = None

    def read(self, image: int, ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(source, target, mask)`` pixels ``[ys, xs]`` of ``image``; mask ``None`` without one."""
        def one(arr: StoredImages) -> np.ndarray:
            return arr.read(None if arr.ndim == 2 else image, ys, xs)

        return one(self.source), one(self.target), None if self.mask is None else one(self.mask)


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
