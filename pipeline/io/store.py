"""The output store: a kernel-map Dataset in Zarr, written block by block.

Layout (see docs/conventions.md): ``kernel(image, y, x, ky, kx)`` and per-tile
diagnostics on ``(image, y, x)``, coordinates ``image``, ``y``, ``x`` (tile
centres), ``ky``, ``kx`` (kernel offsets); root attributes ``tile_grid`` (the
grid's rule, :mod:`pipeline.core.tiles`; a store without it has the older
``step`` grid) and ``input_shape`` (the images' ``[ny, nx]``) among them.  Every block of tiles owns exactly
one chunk of ``kernel`` and one chunk of ``status/records`` ``(image, y, x,
field)``: the block's per-tile diagnostics with a ``written`` field of 1, its
completion record, written after its kernels (chunk presence alone is no such
record).  A block therefore costs two chunk writes whatever the number of
diagnostics.  Once every block of an image is recorded, the client fits the
image's kernel-field model (``model_*`` variables) and copies its diagnostics
from the records into the Dataset's variables, for groups of images at a time
(``IMAGES_PER_CHUNK`` images share a chunk of those variables).  The root
attribute ``kernelmap_status`` is ``"incomplete"`` until every block and every
image's diagnostics are written, then ``"complete"``.

Many small images would mean millions of small files, so where an image's
arrays are small (:attr:`StoreLayout.images_per_shard` above 1: at least
``IMAGES_PER_CHUNK`` images' kernels, records and model in ``SHARD_BYTES``)
every array along ``image`` is a Zarr 3 sharded array: the same chunks, stored
``images_per_shard`` images to a file.  A shard is rewritten whole, so only
one process may write it: the blocks' tasks then write nothing, and the client
writes each finished image's kernels and records with its diagnostics and
model (records before the model, so an interrupted run resumes as before:
blocks without a record are computed again).

:class:`OutputStore` is a store at a path: it decides how a run opens it
under ``output.mode`` (:meth:`OutputStore.opening`, reading only), creates it,
writes blocks (from any process: it travels as its path and identifier),
reads blocks back, writes finished images and marks it complete.  A local
store is overwritten by writing the new one beside it and swapping it in once
complete (:mod:`pipeline.io.swap`; :meth:`Opening.finish`): ``output.mode:
resume`` after an interrupted overwrite resumes that replacement (the output
keeps the earlier result until it completes), ``overwrite`` removes it and
starts again, ``create`` is refused naming it.  A store at a URL is removed,
then written in place.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import zarr

from .. import flags as fl
from ..core.estimate import FORWARD, REVERSE
from ..core.field import KernelField, polynomial_terms
from ..core.tiles import STEP, Block, TileGrid
from ..errors import OptionError
from .paths import check_writable
from .swap import NEW, Leftover, created_in_place, discard, is_url, leftovers, new_sibling, swap_into_place, tidy

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["DIAGNOSTICS", "DIRECTION_ATTRS", "FORWARD", "IMAGES_PER_CHUNK", "MODEL_VARIABLES", "RECORD_FIELDS",
           "REVERSE", "ImageResults", "Opening", "OutputStore", "StoreLayout", "block_record", "consecutive_runs",
           "consolidate", "file_in_the_way", "icrs_positions", "image_encoding", "json_attr", "store_tile_grid",
           "whole_image_shards"]

STATUS_GROUP = "status"
RECORDS_ARRAY = "records"

#: Per-tile diagnostics written beside the kernel: name -> (dtype, attributes).
DIAGNOSTICS: dict[str, tuple[str, dict[str, str]]] = {
    "flux": ("float", {"long_name": "kernel sum: flux scale of the target relative to the source",
                       "units": "1"}),
    "background": ("float", {"long_name": "constant offset of the target relative to kernel * source",
                             "units": "target units"}),
    "residual": ("float", {"long_name": "RMS of the fit residual over its robust standard deviation "
                                        "(about 1 for a fit down to the noise)", "units": "1"}),
    "noise": ("float", {"long_name": "robust standard deviation of the fit residual",
                        "units": "target units"}),
    "snr": ("float", {"long_name": "RMS of the model kernel * source over the noise", "units": "1"}),
    "centroid_y": ("float", {"long_name": "kernel centroid offset from the kernel centre along y "
                                          "(adaptive moments)", "units": "pixel"}),
    "centroid_x": ("float", {"long_name": "kernel centroid offset from the kernel centre along x "
                                          "(adaptive moments)", "units": "pixel"}),
    "fwhm": ("float", {"long_name": "kernel FWHM from Gaussian-weighted adaptive second moments, "
                                    "2 sqrt(2 ln 2) det(M)^(1/4)", "units": "pixel"}),
    "size": ("float", {"long_name": "kernel size det(M)^(1/4) from adaptive second moments (the sigma of "
                                    "a round Gaussian)", "units": "pixel"}),
    "e1": ("float", {"long_name": "kernel ellipticity (Mxx - Myy) / (Mxx + Myy)", "units": "1"}),
    "e2": ("float", {"long_name": "kernel ellipticity 2 Mxy / (Mxx + Myy)", "units": "1"}),
    "ellipticity": ("float", {"long_name": "kernel ellipticity |e| = (a^2 - b^2) / (a^2 + b^2)",
                              "units": "1"}),
    "position_angle": ("float", {"long_name": "position angle of the kernel's major axis, from +x towards +y: "
                                              "atan2(e2, e1) / 2", "units": "degree"}),
    "regularization": ("float", {"long_name": "dimensionless regularisation strength used "
                                              "(geometric mean over penalty terms; NaN if none)",
                                 "units": "1"}),
    "n_valid": ("int32", {"long_name": "target pixels fitted (lstsq) or segments used (welch)"}),
    "width_difference": ("float", {
        "long_name": "FWHM(target)^2 - FWHM(source)^2 of the input pair from the ratio of their power spectra "
                     "(Gaussian-equivalent widths): positive where the target is the blurrier image, whatever "
                     "the image's direction", "units": "pixel^2"}),
    "width_difference_error": ("float", {"long_name": "one-sigma uncertainty of width_difference",
                                         "units": "pixel^2"}),
    "quality_flag": ("uint16", {"long_name": "quality flags of the tile",
                                "flag_descriptions": fl.cf_flag_attrs()["flag_descriptions"]}),
}

#: Images per chunk of the per-tile diagnostics and the model variables: the client writes
#: them for groups of finished images, so a group costs one chunk write per variable.
IMAGES_PER_CHUNK = 16

#: Bytes of an image-axis array's shard at most (the largest of the image's kernels, records and model
#: coefficients, times the images per shard): images smaller than this over ``IMAGES_PER_CHUNK`` are sharded.
SHARD_BYTES = 16 * 2**20

#: Images per shard at most.
MAX_IMAGES_PER_SHARD = 4096

#: Per-image scalars of the kernel-field model: name -> (dtype, fill value, attributes).
MODEL_VARIABLES: dict[str, tuple[str, Any, dict[str, str]]] = {
    "model_degree": ("int8", -1, {"long_name": "total polynomial degree of the kernel-field model "
                                                "(-1: no model, too few usable tiles)"}),
    "model_cv_error": ("float64", np.nan, {
        "long_name": "leave-one-out cross-validated error of the kernel-field model: relative RMS "
                     "difference between each used tile's kernel and the model fitted without it",
        "units": "1"}),
    "model_centre_y": ("float64", np.nan, {"long_name": "centre of the model's v coordinate", "units": "pixel"}),
    "model_centre_x": ("float64", np.nan, {"long_name": "centre of the model's u coordinate", "units": "pixel"}),
    "model_scale_y": ("float64", np.nan, {"long_name": "scale of the model's v coordinate", "units": "pixel"}),
    "model_scale_x": ("float64", np.nan, {"long_name": "scale of the model's u coordinate", "units": "pixel"}),
}

#: The per-image ``direction`` variable: 0 until decided, then ``FORWARD`` or ``REVERSE``.
DIRECTION_ATTRS: dict[str, Any] = {
    "long_name": "direction of the image's kernels: 1 forward, target = kernel * source + background; "
                 "-1 reverse, source = kernel * target + background (the sharper image is the one convolved)",
    "flag_values": [REVERSE, FORWARD],
    "flag_meanings": "reverse forward",
}

#: Fields of a block record, in order: ``written`` (1 once the block is stored), the diagnostics, then
#: ``direction``: the direction its tiles were fitted in (their image's, or before the image is decided, the
#: majority of the block's own tiles: see :mod:`pipeline.job.finish`).
RECORD_FIELDS: tuple[str, ...] = ("written", *DIAGNOSTICS, "direction")


@dataclass(frozen=True)
class StoreLayout:
    """What the output holds: the grid, images, kernel size and storage precision."""

    grid: TileGrid
    images: np.ndarray
    image_attrs: dict[str, Any]
    kernel_size: int
    dtype: str  # float32 or float64
    model_degree: int = 3  # highest degree of the kernel-field model: its number of terms
    wcs: str = ""  # the input's reference WCS (FITS header text): the tile centres get ra and dec
    #: the input's other coordinates along ``image``: ``{name: (values, attributes)}``
    image_coords: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    #: images per shard asked (``output.images_per_shard``): ``None`` chooses by size, 1 is no shards
    shard_images: int | None = None

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def image_bytes(self) -> int:
        """Bytes of the largest of one image's arrays along ``image``: its kernels, block records or model
        coefficients."""
        ty, tx = self.grid.shape
        k2 = self.kernel_size**2
        return max(ty * tx * k2 * np.dtype(self.dtype).itemsize, ty * tx * len(RECORD_FIELDS) * 8,
                   len(polynomial_terms(self.model_degree)) * k2 * 8)

    @property
    def images_per_shard(self) -> int:
        """Images stored to one file of every array along ``image``: :attr:`shard_images` where asked, else a
        multiple of ``IMAGES_PER_CHUNK`` whose largest array takes at most ``SHARD_BYTES``, 1 (no shards)
        where not even ``IMAGES_PER_CHUNK`` images fit; never more than the images (rounded up to whole
        chunks), and 1 for a single image."""
        n, per = self.n_images, min(self.n_images, IMAGES_PER_CHUNK)
        if self.shard_images is not None:
            fit = self.shard_images
        else:
            fit = SHARD_BYTES // self.image_bytes
            fit = 1 if fit < per else min(fit, MAX_IMAGES_PER_SHARD)
        if n < 2 or fit < 2:
            return 1
        fit = min(fit, -(-n // per) * per)
        return max(per, fit // per * per)


def _coordinates(layout: StoreLayout, attrs: dict[str, Any]) -> xr.Dataset:
    """The coordinates and root attributes; xarray writes them (CF-encoding image labels)."""
    import xarray as xr

    grid, h = layout.grid, layout.kernel_size // 2
    images = layout.images
    if images.dtype.kind in "US":
        images = images.astype(object)
    coords = {
        "image": ("image", images, dict(layout.image_attrs)),
        "y": ("y", grid.centres_y.astype(np.float64),
              {"long_name": "tile centre row in input pixel coordinates", "units": "pixel"}),
        "x": ("x", grid.centres_x.astype(np.float64),
              {"long_name": "tile centre column in input pixel coordinates", "units": "pixel"}),
        "ky": ("ky", np.arange(-h, h + 1), {"long_name": "kernel row offset", "units": "pixel"}),
        "kx": ("kx", np.arange(-h, h + 1), {"long_name": "kernel column offset", "units": "pixel"}),
        "term": ("term", np.array([f"P{i}(u)P{j}(v)" for i, j in polynomial_terms(layout.model_degree)],
                                  dtype=object),
                 {"long_name": "term of the kernel-field model: Legendre polynomials P_i, P_j of "
                               "u = (x - model_centre_x) / model_scale_x, v = (y - model_centre_y) / model_scale_y"}),
    }
    for name, (values, attributes) in layout.image_coords.items():
        if name not in coords:
            coords[name] = ("image", values.astype(object) if values.dtype.kind in "US" else values,
                            dict(attributes))
    if layout.wcs:
        ra, dec = tile_sky_positions(layout.wcs, grid.centres_y, grid.centres_x)
        coords["ra"] = (("y", "x"), ra, {"long_name": "right ascension of the tile centre", "units": "deg"})
        coords["dec"] = (("y", "x"), dec, {"long_name": "declination of the tile centre", "units": "deg"})
        attrs = {**attrs, "reference_wcs": layout.wcs}
    return xr.Dataset(coords=coords, attrs=attrs)


def tile_sky_positions(wcs: str, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ra, dec)`` in degrees (ICRS, whatever the WCS's own frame and axis order), ``(len(y), len(x))``, of
    pixel positions under a WCS given as FITS header text."""
    from astropy.io import fits
    from astropy.wcs import WCS

    celestial = WCS(fits.Header.fromstring(wcs, sep="\n")).celestial
    return icrs_positions(celestial, *np.meshgrid(np.asarray(y, np.float64), np.asarray(x, np.float64),
                                                   indexing="ij"))


def icrs_positions(wcs: Any, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ra, dec)`` in degrees, ICRS, of zero-based pixel positions ``(y, x)`` under a celestial
    :class:`astropy.wcs.WCS` (any axis order, any celestial frame)."""
    sky = wcs.pixel_to_world(np.asarray(x, np.float64), np.asarray(y, np.float64)).icrs
    return np.asarray(sky.ra.deg, dtype=np.float64), np.asarray(sky.dec.deg, dtype=np.float64)


def _create_variables(group: zarr.Group, layout: StoreLayout) -> None:
    """The data variables and the block records, empty (metadata only; fill values read back); sharded
    along ``image`` where :attr:`StoreLayout.images_per_shard` says."""
    grid, k, n = layout.grid, layout.kernel_size, layout.n_images
    ty, tx = grid.shape
    by, bx = grid.block_tiles
    per = min(n, IMAGES_PER_CHUNK)
    shard = layout.images_per_shard

    def create_array(name: str, *, shape: tuple[int, ...], chunks: tuple[int, ...], into: zarr.Group = group,
                     **kwargs: Any) -> None:
        # a shard holds whole chunks: every image's all of them, ``shard`` images
        shards = (shard, *(-(-d // c) * c for d, c in zip(shape[1:], chunks[1:]))) if shard > chunks[0] else None
        into.create_array(name, shape=shape, chunks=chunks, shards=shards, **kwargs)

    create_array(
        "kernel", shape=(n, ty, tx, k, k), chunks=(1, by, bx, k, k), dtype=layout.dtype,
        fill_value=np.nan, dimension_names=("image", "y", "x", "ky", "kx"),
        attributes={"long_name": "convolution kernel: target = kernel * source + background where the image's "
                                 "direction is 1 (forward), source = kernel * target + background where it is -1 "
                                 "(reverse)",
                    "convention": "true convolution (scipy.signal.fftconvolve, mode 'same'); "
                                  "kernel centre at (ky, kx) = (0, 0)"},
    )
    create_array("direction", shape=(n,), chunks=(per,), dtype="int8", fill_value=0, dimension_names=("image",),
                 attributes=DIRECTION_ATTRS)
    flag_attrs = {key: value for key, value in fl.cf_flag_attrs().items() if key != "flag_descriptions"}
    for name, (kind, var_attrs) in DIAGNOSTICS.items():
        extra = flag_attrs if name == "quality_flag" else {}
        create_array(
            name, shape=(n, ty, tx), chunks=(per, ty, tx), dtype=layout.dtype if kind == "float" else kind,
            fill_value=np.nan if kind == "float" else 0, dimension_names=("image", "y", "x"),
            attributes=_json_ready({**var_attrs, **extra}),
        )
    n_terms = len(polynomial_terms(layout.model_degree))
    create_array(
        "model_coefficient", shape=(n, n_terms, k, k), chunks=(per, n_terms, k, k), dtype="float64",
        fill_value=np.nan, dimension_names=("image", "term", "ky", "kx"),
        attributes={"long_name": "coefficients of the smooth kernel-field model: kernel(y, x) = "
                                 "sum over term of model_coefficient * term(u, v); NaN for terms above "
                                 "model_degree"},
    )
    for name, (dtype, fill, var_attrs) in MODEL_VARIABLES.items():
        create_array(name, shape=(n,), chunks=(per,), dtype=dtype, fill_value=fill, dimension_names=("image",),
                     attributes=var_attrs)
    create_array(
        "model_residual", shape=(n, ty, tx), chunks=(per, ty, tx), dtype=layout.dtype, fill_value=np.nan,
        dimension_names=("image", "y", "x"),
        attributes={"long_name": "L2 norm of (tile kernel - model kernel) over that of the model kernel, "
                                 "at the tile centre", "units": "1"},
    )
    create_array(
        RECORDS_ARRAY, into=group.create_group(STATUS_GROUP), shape=(n, ty, tx, len(RECORD_FIELDS)),
        chunks=(1, by, bx, len(RECORD_FIELDS)), dtype="float64", fill_value=np.nan,
        dimension_names=("image", "y", "x", "field"),
        attributes={"long_name": "per-block completion records: the per-tile diagnostics of each "
                                 "written block, field 'written' = 1",
                    "fields": list(RECORD_FIELDS)},
    )


def _json_ready(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes with NumPy values as plain Python (lists, ints)."""
    return {key: value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
            for key, value in attrs.items()}


def consolidate(path: str) -> None:
    """Write consolidated metadata (what xarray reads first)."""
    with warnings.catch_warnings():
        # consolidated metadata is not yet part of the Zarr v3 specification;
        # xarray reads it, and without it every plain open_zarr warns
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(path)


def _location(path: str) -> str:
    """``file://`` URLs as plain paths (local folders are created as needed); other URLs as given."""
    text = str(path)
    if text.startswith("file://"):
        return fsspec.core.url_to_fs(text)[1]
    return text


def block_record(results: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """``(ny, nx, field)`` record of a block's tiles from per-tile results (raster order)."""
    record = np.empty((*shape, len(RECORD_FIELDS)), dtype=np.float64)
    record[..., 0] = 1.0
    for i, name in enumerate(RECORD_FIELDS[1:], start=1):
        record[..., i] = np.asarray(results[name], dtype=np.float64).reshape(shape)
    return record


@dataclass(frozen=True)
class ImageResults:
    """What is written per image once all its blocks are in: diagnostics and the kernel-field model."""

    image: int
    records: np.ndarray  #: ``(y, x, field)`` block records of the image
    extra_flags: np.ndarray  #: ``(y, x)`` flags decided per image, OR-ed into ``quality_flag``
    field: KernelField | None  #: the model; ``None`` where none could be fitted
    residual: np.ndarray  #: ``(y, x)`` tile-versus-model residual
    #: ``(y, x, ky, kx)``: the image's kernels, written with its records where given (a sharded store, whose
    #: blocks' tasks write nothing); ``None`` where the blocks wrote both
    kernels: np.ndarray | None = None
    #: the image's direction (``FORWARD``, ``REVERSE``), written with its model; 0 leaves it as stored
    direction: int = 0


@dataclass(frozen=True, eq=False)
class Opening:
    """How a run opens its output store, decided from ``output.mode`` and what exists (reading only).

    ``action`` is ``create``, ``overwrite`` or ``resume``; ``refusal`` the error a
    run raises before it starts anything where ``output.mode`` forbids going on.
    A resumable ``store`` comes with its identifier, its own blocks (its chunks),
    its tile-grid rule (``tile_grid``: :data:`~pipeline.core.tiles.STEP` for a
    store written before the attribute existed), its tiles per image
    ``(y, x)`` and the ``(image, block_y, block_x)`` map of the blocks already
    recorded.  :meth:`open` carries the decision out.
    """

    action: str
    store: OutputStore
    refusal: Exception | None = None
    block_tiles: tuple[int, int] | None = None
    done: np.ndarray | None = None
    tile_grid: str | None = None
    tiles: tuple[int, int] | None = None
    #: where the result goes once complete, where the run writes a replacement beside it (``store`` is then
    #: that replacement, ``PATH.kernelmap-new-<token>``); empty: the store's own path
    final: str = ""
    #: replacements left by interrupted overwrites, removed before the store is written
    leftovers: tuple[Leftover, ...] = ()

    @property
    def output(self) -> str:
        """The output path (``output.path``): where the result is once the run completes."""
        return self.final or self.store.path

    @property
    def replacing(self) -> bool:
        """Whether the run writes beside the output and swaps its result in once complete."""
        return bool(self.final) and self.final != self.store.path

    def open(self, layout: StoreLayout, attrs: dict[str, Any], *,
             log: Callable[[str], None] = print) -> OutputStore:
        """Create, replace or reopen the store as decided; returns it with its identifier.

        Raises the refusal, if any, before touching anything.  ``layout`` and
        ``attrs`` (root attributes) are those of a created store.
        """
        if self.refusal is not None:
            raise self.refusal
        store = self.store
        if not is_url(self.output):
            tidy(_location(self.output), log)  # the earlier result an interrupted swap set aside
        for leftover in self.leftovers:
            log(f"removing {leftover.describe()}")
            discard(leftover)
        if self.action == "resume":
            _remove_partial_writes(store.location, log)
            done = self.done if self.done is not None else store.completed_blocks()
            if self.replacing:
                log(f"resuming the replacement of {self.output} that an interrupted output.mode=overwrite left; "
                    f"{self.output} keeps the earlier result until it is complete")
            log(f"resuming {store.path}: {int(done.sum())} of {done.size} blocks already done, skipped")
            return store
        if self.action == "overwrite":
            if self.replacing:
                log(f"overwriting {self.output}: the new result is written to {store.path} and replaces it once "
                    "complete")
            else:
                log(f"overwriting {store.path}")
                store.remove()
        return store.create(layout, attrs)

    def finish(self, store: OutputStore, *, log: Callable[[str], None] = print) -> None:
        """Once the run's ``store`` is complete: swap it into place where it replaces the output."""
        if self.replacing:
            swap_into_place(store.location, _location(self.output))
            log(f"replaced {self.output} with the new result")


def _remove_partial_writes(location: str, log: Callable[[str], None]) -> None:
    """Remove the temporary files of chunk writes a killed run left in the local store at ``location``
    (Zarr writes a chunk to ``NAME.<token>.partial`` and renames it: the chunk itself is whole or absent)."""
    if "://" in location:
        return
    partial = [p for p in Path(location).rglob("*.partial") if p.is_file()]
    for p in partial:
        p.unlink(missing_ok=True)
    if partial:
        log(f"removed {len(partial)} unfinished chunk write(s) an interrupted run left in {location}")


#: Opened arrays of the stores this process writes blocks to: (location, store id) -> arrays.
_OPENED: OrderedDict[tuple[str, str], dict[str, zarr.Array]] = OrderedDict()
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 4


@dataclass(frozen=True)
class OutputStore:
    """The kernel-map store at ``path`` (a local path or an fsspec URL).

    Only its path, identifier and sharding travel with it (tasks carry it to
    write their blocks); ``id`` is the ``kernelmap_store_id`` given at
    creation, empty for a store not yet created or opened (:meth:`create`,
    :meth:`open`); ``images_per_shard`` is its arrays' images to a shard (1:
    not sharded).
    """

    path: str
    id: str = ""
    images_per_shard: int = 1

    @property
    def sharded(self) -> bool:
        """Whether its arrays along ``image`` are sharded: then only the client writes (blocks' kernels and
        records with their images' diagnostics, :meth:`write_images`), never the blocks' tasks."""
        return self.images_per_shard > 1

    @property
    def location(self) -> str:
        """Where Zarr opens it: ``file://`` URLs as plain paths, other URLs as given."""
        return _location(self.path)

    # ---- existence, attributes

    def exists(self) -> bool:
        """Whether anything already exists at the path."""
        location = self.location
        if "://" not in location:
            return Path(location).exists()
        fs, root = fsspec.core.url_to_fs(location)
        return bool(fs.exists(root))

    def remove(self) -> None:
        """Delete what exists at the path."""
        location = self.location
        if "://" in location:
            fs, root = fsspec.core.url_to_fs(location)
            fs.rm(root, recursive=True)
            return
        p = Path(location)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def attrs(self) -> dict[str, Any]:
        """Root attributes."""
        return dict(zarr.open_group(self.location, mode="r").attrs)

    def replaceable(self, attribute: str) -> bool:
        """Whether what exists at the path may be replaced when asked: nothing, an empty folder, or a Zarr
        group whose root attributes hold ``attribute`` (what kernelmap wrote there)."""
        location = self.location
        if "://" not in location:
            p = Path(location)
            if not p.exists() or (p.is_dir() and not any(p.iterdir())):
                return True
        elif not self.exists():
            return True
        try:
            return attribute in zarr.open_group(location, mode="r").attrs
        except (OSError, ValueError, LookupError):  # not a Zarr group (Zarr's errors are ValueErrors)
            return False

    # ---- the output-mode policy

    def opening(self, mode: str, *, fingerprint: str, input_identity: str,
                differences: Callable[[str | None], list[str]] | None = None) -> Opening:
        """Decide how a run with ``output.mode`` ``mode`` opens this store, reading only.

        ``fingerprint`` and ``input_identity`` are the ``kernelmap_fingerprint``
        and ``kernelmap_input`` attributes the run would write; a store is resumed
        only where both match; ``differences`` names the settings in which the run's job differs from
        the stored ``kernelmap_config``.  Nothing raises here: a refusal is returned.
        """
        try:
            return self._opening(mode, fingerprint, input_identity, differences)
        except (OSError, ValueError, LookupError) as exc:  # an unreadable store (Zarr's errors are
            return Opening(mode, self, refusal=exc)        # ValueErrors): the run raises it before it starts

    def _opening(self, mode: str, fingerprint: str, input_identity: str,
                 differences: Callable[[str | None], list[str]] | None) -> Opening:
        blocked = file_in_the_way(self.location)
        if blocked is not None:
            return Opening(mode, self, refusal=OptionError(
                f"output.path {self.path}: {blocked} is a file, not a folder, so nothing can be written under it: "
                "nothing was changed; choose another output.path"))
        check_writable(self.location, f"output.path {self.path}")  # a refusal: opening() returns it
        found = tuple(x for x in leftovers(self.location) if x.kind == "new")  # replacements left unfinished
        if mode == "resume" and found:
            return self._resume_replacement(found, fingerprint, input_identity, differences)
        left = (f" (an interrupted output.mode=overwrite also left {found[0].describe()}: output.mode=resume "
                "finishes it)") if found else ""
        if not self.exists():
            if found and mode == "create":
                return Opening("create", self, refusal=OptionError(
                    f"output.path {self.path}: an interrupted output.mode=overwrite left {found[0].describe()}: "
                    "nothing was changed; use output.mode=resume to finish it, or output.mode=overwrite to start "
                    "again (e.g. --set output.mode=resume)"))
            return Opening("create", self, leftovers=found if mode == "overwrite" else ())
        if mode == "create":
            return Opening("create", self, refusal=OptionError(
                f"output.path {self.path} already exists and output.mode is 'create'{left}: nothing was changed. "
                "Use output.mode=resume to finish an interrupted run of this job, or output.mode=overwrite "
                "to replace it (e.g. --set output.mode=resume)"
            ))
        if mode == "overwrite" and not self.replaceable("kernelmap_fingerprint"):
            return Opening("overwrite", self, refusal=OptionError(
                f"output.path {self.path} exists and is not a kernel map written by kernelmap run: nothing was "
                "changed; output.mode=overwrite replaces only those. Remove it yourself, or choose another "
                "output.path"
            ))
        if mode != "resume":  # overwrite: written beside, swapped in once complete (in place at a URL, or
            location = self.location  # over an empty folder)
            if is_url(location) or (Path(location).is_dir() and not any(Path(location).iterdir())):
                return Opening(mode, self, leftovers=found)
            return Opening(mode, replace(self, path=new_sibling(self.path)), final=self.path, leftovers=found)
        try:
            old = self.attrs()
        except (OSError, ValueError, LookupError):  # not a Zarr group (Zarr's errors are ValueErrors)
            old = {}
        if "kernelmap_fingerprint" not in old:
            return Opening("resume", self, refusal=OptionError(
                f"output.mode=resume: {self.path} exists and is not a kernel map written by kernelmap run: nothing "
                "was changed; output.mode=resume finishes only those. Choose another output.path"))
        records = self._records(zarr.open_group(self.location, mode="r"))
        if old.get("kernelmap_fingerprint") != fingerprint:
            named = differences(old.get("kernelmap_config")) if differences is not None else []
            said = ("; ".join(named) + "): set these as the store has them to resume it (e.g. "
                    f"--set {named[0].split(':')[0]}=...)" if named else
                    "tiles, kernel, model, input or output dtype differ): run the same job again")
            return Opening("resume", self, refusal=OptionError(
                f"output.mode=resume: {self.path} was made by a different configuration ({said}, or use "
                "output.mode=overwrite or another output.path"
            ))
        if old.get("kernelmap_input") != input_identity:
            return Opening("resume", self, refusal=OptionError(
                f"output.mode=resume: {self.path} was made from different input data "
                f"({json_attr(old.get('kernelmap_input'))[:200]}); use output.mode=overwrite or another "
                "output.path"
            ))
        store = replace(self, id=str(old.get("kernelmap_store_id", "")),
                        images_per_shard=int(records.shards[0]) if records.shards else 1)
        return Opening("resume", store, block_tiles=store.block_tiles(), done=store.completed_blocks(),
                       tile_grid=store_tile_grid(old), tiles=(int(records.shape[1]), int(records.shape[2])))

    def _resume_replacement(self, found: tuple[Leftover, ...], fingerprint: str, input_identity: str,
                            differences: Callable[[str | None], list[str]] | None) -> Opening:
        """``output.mode=resume`` where an interrupted overwrite left its replacement beside the output: the
        replacement is resumed (and swapped in once complete); the output keeps the earlier result until
        then."""
        if len(found) > 1:
            return Opening("resume", self, refusal=OptionError(
                f"output.mode=resume: interrupted overwrites of {self.path} left {len(found)} replacements ("
                f"{', '.join(x.path for x in found)}): nothing was changed; remove all but the one to finish, or "
                "use output.mode=overwrite to start again"))
        sibling = replace(self, path=found[0].path)
        opening = sibling._opening("resume", fingerprint, input_identity, differences)
        if isinstance(opening.refusal, OptionError):
            return replace(opening, final=self.path, refusal=OptionError(
                f"{opening.refusal} ({found[0].describe()}; {self.path} keeps the earlier result; "
                "output.mode=overwrite removes that replacement and starts again)"))
        return replace(opening, final=self.path)

    # ---- creating, opening

    def create(self, layout: StoreLayout, attrs: dict[str, Any]) -> OutputStore:
        """Write the empty store: coordinates, attributes, variable metadata and the block records.

        Refuses (Zarr's error) where something exists; returns the store with its new identifier.  A local
        store is set up beside its path and renamed into place (:func:`~pipeline.io.swap.created_in_place`).
        """
        store_id = uuid.uuid4().hex
        ds = _coordinates(layout, {**attrs, "kernelmap_status": "incomplete", "kernelmap_store_id": store_id})

        def setup(location: str) -> None:
            ds.to_zarr(location, mode="w-", consolidated=False, zarr_format=3)
            _create_variables(zarr.open_group(location, mode="r+"), layout)
            consolidate(location)

        if NEW in Path(self.location).name:  # a replacement, itself beside the output: set up where it is
            setup(self.location)
        else:  # set up beside, then renamed into place: a run stopped meanwhile leaves no half-made store
            created_in_place(self.location, setup)
        return replace(self, id=store_id, images_per_shard=layout.images_per_shard)

    # ---- blocks

    def _records(self, group: zarr.Group) -> zarr.Array:
        try:
            records = group[f"{STATUS_GROUP}/{RECORDS_ARRAY}"]
        except KeyError:
            records = None
        fields = records.attrs.get("fields") if isinstance(records, zarr.Array) else None
        if isinstance(fields, list) and fields and fields[0] == RECORD_FIELDS[0] and fields != list(RECORD_FIELDS):
            missing = [name for name in RECORD_FIELDS if name not in fields]
            raise OptionError(
                f"output.mode=resume: {self.path} was written by an earlier version of kernelmap (its tiles' "
                f"records lack {', '.join(missing) or 'the fields of this version'}), which this version cannot "
                "finish: nothing was changed; use output.mode=overwrite or another output.path")
        if fields != list(RECORD_FIELDS):
            raise OptionError(
                f"output.mode=resume: {self.path} has no block records this version of kernelmap can read, "
                "so its creation was interrupted or another program (or kernelmap version) wrote it; use "
                "output.mode=overwrite or another output.path"
            )
        return records

    def block_tiles(self) -> tuple[int, int]:
        """``(by, bx)`` tiles per block (the chunks of ``kernel`` and of the block records)."""
        records = self._records(zarr.open_group(self.location, mode="r"))
        return int(records.chunks[1]), int(records.chunks[2])

    def completed_blocks(self) -> np.ndarray:
        """``(image, block_y, block_x)`` bool: blocks whose record is written."""
        records = self._records(zarr.open_group(self.location, mode="r"))
        by, bx = records.chunks[1:3]
        written = np.asarray(records[:, ::by, ::bx, 0])
        return written == 1

    def modelled_images(self) -> np.ndarray:
        """``(image,)`` bool: images whose kernel-field model is written (``model_degree`` at least 0; an
        image whose model could not be fitted reads as not modelled)."""
        return np.asarray(zarr.open_group(self.location, mode="r")["model_degree"][:]) >= 0

    def read_directions(self) -> np.ndarray:
        """``(image,)`` int8: each image's direction (``FORWARD``, ``REVERSE``), written with its model, 0
        where the image is not finished yet; a store written before directions existed reads as all
        forward."""
        group = zarr.open_group(self.location, mode="r")
        if "direction" not in group:
            n = group["kernel"].shape[0]
            return np.full(n, FORWARD, dtype=np.int8)
        return np.asarray(group["direction"][:], dtype=np.int8)

    def _block_arrays(self) -> dict[str, zarr.Array]:
        """The arrays blocks write, opened once per process and store (their metadata is read once).

        The store's identifier keys them with its location, so a store replaced at
        the same path is opened afresh; a store without one is opened every time.
        """
        key = (self.location, self.id)
        if self.id:
            with _OPENED_LOCK:
                arrays = _OPENED.get(key)
                if arrays is not None:
                    _OPENED.move_to_end(key)
                    return arrays
        group = zarr.open_group(self.location, mode="r+")
        arrays = {name: group[name] for name in ("kernel", f"{STATUS_GROUP}/{RECORDS_ARRAY}")}
        if self.id:
            with _OPENED_LOCK:
                _OPENED[key] = arrays
                while len(_OPENED) > _OPENED_MAX:
                    _OPENED.popitem(last=False)
        return arrays

    def write_block(self, block: Block, kernels: np.ndarray, record: np.ndarray) -> None:
        """Write one block's kernels ``(ny, nx, k, k)`` into its chunk, then its record (marks it done).

        Only for a store that is not :attr:`sharded` where several processes write (a shard is rewritten
        whole)."""
        arrays = self._block_arrays()
        region = (block.image, slice(block.ty0, block.ty1), slice(block.tx0, block.tx1))
        kern = arrays["kernel"]
        kern[region] = kernels.astype(kern.dtype, copy=False)
        arrays[f"{STATUS_GROUP}/{RECORDS_ARRAY}"][region] = record

    def read_records(self, image: int) -> np.ndarray:
        """``(y, x, field)`` records of one image's tiles (NaN where a block is not written)."""
        return np.asarray(self._records(zarr.open_group(self.location, mode="r"))[image])

    def read_kernels(self, image: int) -> np.ndarray:
        """``(y, x, ky, kx)`` kernels of one image."""
        return np.asarray(zarr.open_group(self.location, mode="r")["kernel"][image])

    def read_blocks(self, blocks: Iterable[Block]) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
        """``(block, record, kernels)`` of written blocks, as their task returned them.

        Blocks come image by image in the order given; each image's records and
        kernels are read once.
        """
        by_image: dict[int, list[Block]] = {}
        for block in blocks:
            by_image.setdefault(block.image, []).append(block)
        for image, image_blocks in by_image.items():
            records, kernels = self.read_records(image), self.read_kernels(image)
            for block in image_blocks:
                region = (slice(block.ty0, block.ty1), slice(block.tx0, block.tx1))
                yield block, records[region], kernels[region]

    # ---- images, completion

    def write_images(self, results: list[ImageResults]) -> None:
        """Write the diagnostics and models of several images: one write per variable and run of
        consecutive images (``IMAGES_PER_CHUNK`` images share a chunk, so a group of finished images
        costs about one chunk write per variable).  Results with their kernels (all or none) have those
        and their block records written first (a sharded store)."""
        if not results:
            return
        group = zarr.open_group(self.location, mode="r+")
        results = sorted(results, key=lambda r: r.image)
        coef = group["model_coefficient"]
        for start, stop in consecutive_runs([r.image for r in results]):
            part = results[start:stop]
            where = slice(part[0].image, part[-1].image + 1)
            records = np.stack([r.records for r in part])
            if part[0].kernels is not None:  # the blocks' kernels, then their records (which mark them done)
                kern = group["kernel"]
                kern[where] = np.stack([r.kernels for r in part]).astype(kern.dtype, copy=False)
                self._records(group)[where] = records
            for i, name in enumerate(DIAGNOSTICS, start=1):
                arr = group[name]
                values = records[..., i]
                if arr.dtype.kind != "f":
                    values = np.nan_to_num(values, nan=0.0).astype(arr.dtype)
                if name == "quality_flag":
                    values = values | np.stack([r.extra_flags for r in part]).astype(arr.dtype)
                arr[where] = values.astype(arr.dtype)
            coefficients = np.full((len(part), *coef.shape[1:]), np.nan)
            scalars = {name: np.full(len(part), fill, dtype=dtype)
                       for name, (dtype, fill, _) in MODEL_VARIABLES.items()}
            for j, r in enumerate(part):
                if r.field is None:
                    continue
                values = r.field.to_arrays()
                coefficients[j, : len(values["model_coefficient"])] = values["model_coefficient"]
                for name in scalars:
                    scalars[name][j] = values[name]
            if any(r.direction for r in part):
                stored = np.asarray(group["direction"][where])
                group["direction"][where] = np.array([r.direction or d for r, d in zip(part, stored)], dtype=np.int8)
            residual = group["model_residual"]
            residual[where] = np.stack([r.residual for r in part]).astype(residual.dtype)
            coef[where] = coefficients
            # the degree last: it marks the image's model written (a resumed joint run leaves such images)
            for name in sorted(scalars, key=lambda name: name == "model_degree"):
                group[name][where] = scalars[name]

    def mark_complete(self, attrs: dict[str, Any] | None = None) -> None:
        """Set ``kernelmap_status`` to complete (with extra attributes) and consolidate."""
        location = self.location
        group = zarr.open_group(location, mode="r+")
        group.attrs.update({**(attrs or {}), "kernelmap_status": "complete"})
        consolidate(location)


def store_tile_grid(attrs: dict[str, Any]) -> str:
    """The tile-grid rule of a store from its root attributes: its ``tile_grid``, or
    :data:`~pipeline.core.tiles.STEP` for a store written before that attribute existed."""
    return str(attrs.get("tile_grid", STEP))


def whole_image_shards(n: int, ny: int, nx: int) -> int:
    """Images to a file (Zarr shard) of an ``(n, ny, nx)`` float32 array of whole images: as many as
    ``SHARD_BYTES`` holds (at most ``MAX_IMAGES_PER_SHARD`` and ``n``); 1 (no shards) where fewer than two fit."""
    fit = min(SHARD_BYTES // (ny * nx * 4), MAX_IMAGES_PER_SHARD, n)
    return fit if fit >= 2 else 1


def image_encoding(shard: int, chunks: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
    """The Zarr encoding of an ``(image, y, x)`` array of ``shape`` images: chunks of one image by ``chunks``,
    and shards of ``shard`` whole images where ``shard`` > 1."""
    (cy, cx), (ny, nx) = chunks, shape
    encoding: dict[str, Any] = {"chunks": (1, cy, cx)}
    if shard > 1:
        encoding["shards"] = (shard, -(-ny // cy) * cy, -(-nx // cx) * cx)
    return encoding


def file_in_the_way(path: str | Path) -> str | None:
    """For a local ``path``: the nearest of its parent folders that exists but is a file (nothing can be
    written under it), else ``None`` (also for URLs)."""
    location = _location(str(path))
    if "://" in location:
        return None
    for parent in Path(location).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else str(parent)
    return None


def consecutive_runs(images: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` positions in ``images`` (sorted) of runs of consecutive indices."""
    starts = [0, *(i for i in range(1, len(images)) if images[i] != images[i - 1] + 1)]
    return list(zip(starts, [*starts[1:], len(images)]))


def json_attr(value: Any) -> str:
    """A JSON string for attributes that hold structures."""
    return json.dumps(value, sort_keys=True, default=str)
