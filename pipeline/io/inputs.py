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
target pixels at or above them bad, widened by ``grow`` pixels: they are set
to NaN in the copies the reader returns (:mod:`pipeline.io.saturation`).

Per-pixel variances come from arrays of the same store shaped like the image
they describe (``input.variance``, or weights, their inverses:
``input.weight``), or from the CCD model of an image, its gain and read noise
(``input.gain``, ``input.read_noise``) applied to its own pixels
(:mod:`pipeline.io.noise`); the reader returns them as float64 variances
beside the pixels.  Saturation levels, gains and read noises are numbers,
per-image coordinates of the store or attributes of the array
(:mod:`pipeline.io.levels`), resolved and checked when the store is opened.

The store is opened read-only and never written.  Everything is checked
before any block is read (the saturation and CCD checks read one chunk of
a few images), and the arrays come back as Dask arrays chunked like the store, so
later steps read whole stored chunks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import zarr
import zarr.errors

from ..core.saturation import mask_saturated
from ..errors import InputError, unreadable_store
from .arrays import (
    IMAGE_DIMS,
    StoredImages,
    axis_order,
    check_dtype,
    describe_array,
    get_array,
    image_dim_name,
    lookup_member,
    name_listing,
    quiet_listing,
    read_unit_shape,
    stored_dimension_names,
    stored_images,
)
from .levels import ImageLevels
from .noise import CCDNoise, Variances, ccd_spec, noise_spec, open_variances
from .saturation import Saturation, SaturationLevels, mask_dtype, read_saturated, saturation_levels

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "BlockPixels", "CCDNoise", "ImageLevels", "InputReader", "Inputs", "Saturation", "SaturationLevels",
    "StoredImages", "Variances", "open_inputs",
]


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
    #: the reference's WCS as FITS header text (the store's ``reference_wcs`` attribute, as ``kernelmap ingest``
    #: writes it); empty without one
    wcs: str = ""
    #: other coordinates along the image axis in the store (1-D arrays along it, e.g. the header keys
    #: ``kernelmap ingest`` keeps): ``{name: (values, attributes)}``, carried to the output
    image_coords: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)

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
    gain: Mapping[str, Any] | None = None,
    read_noise: Mapping[str, Any] | None = None,
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
    gain, read_noise
        ``{"target": value, "source": value}`` (each optional): the CCD model
        of an image, whose variances are then ``max(pixel, 0) / gain +
        (read_noise / gain)**2`` ADU² from its own pixels (not
        sky-subtracted).  Gain in electrons per ADU (> 0), read noise in
        electrons (>= 0; 0 when not given; not without a gain); each value a
        number, a per-image coordinate or an attribute like a saturation
        level.  Not for an image with a ``variance`` or ``weight`` array.

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
        like its image; both ``variance`` and ``weight`` are given; a gain or
        read noise is missing, not finite, not > 0 (gain) or < 0 (read
        noise), given without a gain (read noise) or beside a variance or
        weight array of the same image; the pixels of a sampled image scatter
        far more than its CCD model predicts (sky-subtracted?).
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
            arrays[key] = (name, get_array(grp, name, f"input.{key}", where, group, suggest=True))

    tgt_name, tgt_z = arrays["target"]
    src_name, src_z = arrays["source"]
    for key, (name, z) in arrays.items():
        check_dtype(z, name, f"input.{key}", where, allow_bool=key == "mask")

    tgt_dims = stored_dimension_names(tgt_z)
    if tgt_z.ndim != 3:
        fix = ("store a single image with a leading image axis of length 1" if tgt_z.ndim < 3 else
               "store one 3-D array per value of the extra axes (e.g. per band), or drop an axis of length 1")
        raise InputError(
            f"input.target: array '{tgt_name}' in {where} must be 3-D (image, y, x), got shape "
            f"{tgt_z.shape}; {fix}"
        )
    if src_z.ndim not in (2, 3):
        raise InputError(
            f"input.source: array '{src_name}' in {where} must be 3-D (image, y, x) or 2-D (y, x) "
            f"for one reference shared by every target, got shape {src_z.shape}"
        )

    tgt = stored_images(tgt_z, tgt_name, axis_order(tgt_dims, IMAGE_DIMS))
    src = stored_images(src_z, src_name, axis_order(stored_dimension_names(src_z), IMAGE_DIMS[-src_z.ndim:]))
    n, ny, nx = (int(s) for s in tgt.shape)
    if n == 0:
        raise InputError(f"input.target: array '{tgt_name}' in {where} holds no images (shape {tgt_z.shape}): write "
                         "the images into it, or set input.target to the array that holds them")
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
        order = axis_order(stored_dimension_names(msk_z), IMAGE_DIMS[-msk_z.ndim:])
        msk = stored_images(msk_z, msk_name, order, decode=False)
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

    kind, noise_arrays = noise_spec(variance, weight)
    ccd = ccd_spec(gain, read_noise, noise_arrays, kind)
    noise_names = [name for name in noise_arrays.values() if name is not None]
    image_name = image_dim_name(tgt_dims, IMAGE_DIMS)
    images, image_attrs, image_source = _image_labels(
        grp, image_name, n, where, exclude={name for name, _ in arrays.values()} | set(noise_names)
    )
    labels = () if image_source is None else tuple(str(v) for v in images)
    noise = open_variances(kind, noise_arrays, ccd, grp, {"source": src, "target": tgt}, arrays, where, group,
                           images, labels, image_name,
                           exclude={name for name, _ in arrays.values()} | set(noise_names) | {image_name})

    read_chunks = read_unit_shape(tgt_z)
    order = axis_order(tgt_dims, IMAGE_DIMS)
    chunks = (int(read_chunks[order[1]]), int(read_chunks[order[2]]))

    sat = None
    if saturation is not None:
        stored = {"source": src, "target": tgt}
        sat = saturation_levels(saturation, grp, stored, where, images, image_name,
                          exclude={name for name, _ in arrays.values()} | set(noise_names) | {image_name})

    identity: dict[str, Any] = {
        "store": store_id,
        "group": group or "",
        "image_coordinate": image_source,
        "arrays": {key: describe_array(name, z, decoded=key != "mask") for key, (name, z) in arrays.items()},
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
        wcs=str(grp.attrs.get("reference_wcs", "") or ""),
        image_coords=_image_coordinates(grp, image_name, n, where,
                                        exclude={name for name, _ in arrays.values()} | set(noise_names)
                                        | {image_name}),
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
        if "://" not in where and os.path.exists(where) and not os.path.isdir(where):
            what = "a file" if os.path.isfile(where) else "not a folder (a pipe, socket or device)"
            raise InputError(
                f"input.path: {where} is {what}, not a Zarr store (a folder with zarr.json or .zgroup at its "
                "top): point input.path at the store"
            ) from exc
        if _is_array(where, kwargs):
            raise InputError(
                f"input.path: {where} is a single Zarr array, not a group: point input.path at the "
                "store holding the source and target arrays"
            ) from exc
        raise InputError(
            f"input.path: no Zarr store at {where}: check the path or URL "
            "(a store is a directory with zarr.json or .zgroup at its top)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise InputError(
            f"input.path: the Zarr metadata at the top of {where} is not JSON ({exc}): the store is damaged (its "
            "zarr.json, .zgroup, .zattrs or .zmetadata); restore it from its source, or write the stack again"
        ) from None
    except ValueError as exc:  # e.g. an unknown URL protocol
        raise InputError(f"input.path: cannot open {where}: {exc}: give a local path or a URL whose protocol "
                         "fsspec knows (file://, s3://, gs://, https://, ...)") from exc
    except Exception as exc:  # unreachable, not readable, or the object store's own error
        problem = unreadable_store(exc, where, named="the store", options="input.storage_options",
                                   then=", then run again")
        raise InputError(f"input.path: {problem}") from exc
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
            f"{name_listing(sorted(root.group_keys()))}"
        )
    return node


def _is_array(where: str, kwargs: dict[str, Any]) -> bool:
    """True when ``where`` holds a single array rather than a group."""
    try:
        zarr.open_array(where, **kwargs)
    except Exception:  # anything that is not an array
        return False
    return True



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
            return read_saturated(arr, index, ys, xs, levels.level(index), self.saturation.grow)

        sat, noise = self.saturation, self.variances
        source, target = one(self.source, sat and sat.source), one(self.target, sat and sat.target)
        return BlockPixels(
            source, target, None if self.mask is None else one(self.mask),
            None if noise is None else noise.read("target", image, ys, xs, target),
            None if noise is None else noise.read("source", image, ys, xs, source),
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


# --------------------------------------------------------------------------- image labels


def _image_labels(
    grp: zarr.Group, name: str, n: int, where: str, *, exclude: set[str]
) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """Labels of the image axis, their attributes and the array they came from."""
    node = None if name in exclude else lookup_member(grp, name)
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
    values, counts = np.unique(labels, return_counts=True)
    if (counts > 1).any():
        twice = int(np.argmax(counts > 1))
        label = values[twice]
        shown = repr(label.item()) if label.dtype.kind in "iufbUS" else str(label)
        raise InputError(
            f"input: the image coordinate '{name}' in {where} gives the label {shown} to {counts[twice]} images: "
            "each label names one image, so they must differ; fix the labels, or remove the coordinate (images "
            "are then numbered 0..n-1)"
        )
    return labels, attrs, name


def _image_coordinates(grp: zarr.Group, name: str, n: int, where: str, *, exclude: set[str]
                       ) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """The group's other 1-D arrays along the image axis ``name`` (``n`` long), decoded like the labels."""
    found = {}
    with quiet_listing():
        members = sorted(grp.arrays(), key=lambda item: item[0])
    for key, node in members:
        if key in exclude or node.ndim != 1 or node.shape[0] != n or stored_dimension_names(node) != (name,):
            continue
        attrs = {k: _plain(v) for k, v in node.attrs.items() if k != "_ARRAY_DIMENSIONS"}
        values, attrs = _decode_labels(np.asarray(node[...]), attrs, key, where)
        encoding = {"scale_factor", "add_offset", "missing_value"} | ({"units", "calendar"}
                                                                     if values.dtype.kind in "Mm" else set())
        found[key] = (values, {k: v for k, v in attrs.items() if not k.startswith("_") and k not in encoding})
    return found


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

