"""Stored input arrays, as the modules of :mod:`pipeline.io` read them.

Helpers shared by the input stack (:mod:`pipeline.io.inputs`), the per-image
levels (:mod:`pipeline.io.levels`), saturation (:mod:`pipeline.io.saturation`)
and noise (:mod:`pipeline.io.noise`): looking arrays up in a group with errors
that list what is there, dimension names and axis order, the read unit, the CF
decoding xarray would apply, and :class:`StoredImages`, one array read region
by region.
"""

from __future__ import annotations

import base64
import difflib
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.errors

from ..errors import InputError

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["IMAGE_DIMS", "SPATIAL_DIMS", "CFDecoding", "StoredImages", "axis_order", "cf_decoding", "check_dtype",
           "close_names", "describe_array", "get_array", "image_dim_name", "lookup_member", "name_listing",
           "read_unit_shape", "stored_dimension_names", "stored_images"]

IMAGE_DIMS = ("image", "y", "x")
SPATIAL_DIMS = ("y", "x")
#: Attributes an xarray/CF writer uses to pack values or flag missing ones.
_CF_MISSING = ("_FillValue", "missing_value")
_CF_PACKING = ("scale_factor", "add_offset")


def name_listing(names: list[str]) -> str:
    return ", ".join(names) if names else "(none)"


def get_array(grp: zarr.Group, name: str, key: str, where: str, group: str | None, *,
               suggest: bool = False) -> zarr.Array:
    """Array ``name`` of the group, or an error listing what is there (and, with ``suggest``, close names)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{key}: array names must be non-empty strings, got {name!r}")
    node = lookup_member(grp, name)
    if node is None and grp.metadata.consolidated_metadata is not None:
        # consolidated metadata can be stale: look at the store itself
        fresh = zarr.open_group(grp.store_path, mode="r", use_consolidated=False)
        node, grp = lookup_member(fresh, name), fresh
    place = f"{where} (group '{group}')" if group else where
    if isinstance(node, zarr.Group):
        raise InputError(f"{key}: '{name}' in {place} is a group, not an array: set {key} to an array in it")
    if node is None:
        folder = os.path.join(where, grp.path, name) if "://" not in where else None
        if folder is not None and os.path.isdir(folder):
            raise InputError(f"{key}: '{name}' in {place} is a folder without Zarr metadata (no zarr.json or "
                             ".zarray): the store is damaged there; restore it from its source, or write the "
                             "array again")
        with quiet_listing():
            subgroups = sorted(grp.group_keys())
            names = sorted(grp.array_keys())
        hint = f"; groups there: {name_listing(subgroups)} (set input.group to read one)" if subgroups else ""
        close = close_names(name, names) if suggest else []
        if close:
            hint += f"; did you mean {' or '.join(map(repr, close))}? Set {key} to an array there"
        else:
            hint += f"; set {key} to the name of one of them"
        raise InputError(f"{key}: no array '{name}' in {place}; arrays there: {name_listing(names)}{hint}")
    return node


@contextmanager
def quiet_listing() -> Iterator[None]:
    """Listing a group's members without Zarr's warning about each thing in it that is not Zarr (a stray
    file, a folder without metadata): such things are not arrays, and the listing says what is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        yield


def lookup_member(grp: zarr.Group, name: str) -> zarr.Array | zarr.Group | None:
    """Member ``name`` of the group (``None`` where there is none); refused where its metadata cannot be read."""
    try:
        return grp[name]
    except KeyError:
        return None
    except ValueError as exc:  # metadata that is not JSON, or not Zarr's (Zarr's errors are ValueErrors)
        raise InputError(f"'{name}' in {grp.store_path}: its Zarr metadata cannot be read ({type(exc).__name__}: "
                         f"{exc}): the store is damaged there; restore it from its source, or write the array "
                         "again") from None


def check_dtype(z: zarr.Array, name: str, key: str, where: str, *, allow_bool: bool) -> None:
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


def stored_dimension_names(z: zarr.Array) -> tuple[str | None, ...] | None:
    """Dimension names stored with ``z``: Zarr 3 metadata or xarray's Zarr 2 attribute."""
    names = getattr(z.metadata, "dimension_names", None)
    if names is None:
        names = z.attrs.get("_ARRAY_DIMENSIONS")
    if not isinstance(names, (list, tuple)) or len(names) != z.ndim:
        return None
    return tuple(n if isinstance(n, str) else None for n in names)


def axis_order(names: tuple[str | None, ...] | None, expected: tuple[str, ...]) -> tuple[int, ...]:
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


def image_dim_name(names: tuple[str | None, ...] | None, expected: tuple[str, ...]) -> str:
    """Name of the stored image dimension (``image`` when unnamed)."""
    if names is None:
        return "image"
    return names[axis_order(names, expected)[0]] or "image"


def read_unit_shape(z: zarr.Array) -> tuple[int, ...]:
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
        try:
            stored = self.array[tuple(selection)]
        except Exception as exc:  # a damaged chunk: the codecs' errors are of many kinds
            raise self._unreadable(selection, exc) from exc
        values = np.transpose(self.decode(stored), self.order)
        return values if self.ndim == 2 else values[0]

    def _unreadable(self, selection: list[slice], exc: Exception) -> InputError:
        """The error of a region whose stored chunks cannot be read: the array, the chunks, the store, the fix."""
        chunks = self.array.chunks
        first = tuple(int(s.start or 0) // c for s, c in zip(selection, chunks))
        last = tuple((int(s.stop) - 1 if s.stop is not None else n - 1) // c
                     for s, c, n in zip(selection, chunks, self.array.shape))
        where = f"chunk {first}" if first == last else f"chunks {first} to {last}"
        return InputError(
            f"{self.array.store_path}: array {self.name!r}, {where} (stored axes, chunks of {tuple(chunks)}), "
            f"cannot be read ({type(exc).__name__}: {exc}): the input store is damaged there. Restore it from "
            "its source (or mark those pixels bad with input.mask), then run again with output.mode=resume: "
            "the blocks done so far are kept")

    def to_dask(self) -> da.Array:
        """The whole array as Dask, chunked like the store (its read unit)."""
        import dask.array as da
        from dask.base import tokenize

        z, name = self.array, self.name
        chunks = read_unit_shape(z)
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


def stored_images(z: zarr.Array, name: str, order: tuple[int, ...], *, decode: bool = True) -> StoredImages:
    return StoredImages(z, name, order, cf_decoding(z) if decode else None)


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


def cf_decoding(z: zarr.Array) -> CFDecoding | None:
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


def describe_array(name: str, z: zarr.Array, *, decoded: bool) -> dict[str, Any]:
    """JSON-serialisable identity of one stored array (and the CF decoding applied to it)."""
    names = stored_dimension_names(z)
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


def close_names(name: str, names: list[str]) -> list[str]:
    """Names like ``name``, ignoring case first."""
    by_lower = {c.lower(): c for c in names}
    if name.lower() in by_lower:
        return [by_lower[name.lower()]]
    return [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.6)]

